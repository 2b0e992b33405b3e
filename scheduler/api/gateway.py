"""The gateway deployment: Ray Serve's ingress, holding the model handles, router, ledger and metrics.

Serve constructs it with one DeploymentHandle per model; __serve_build_asgi_app__ then builds the
FastAPI app around this instance, so the routes reach their state through request.app.state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from scheduler.api.errors import ApiError
from scheduler.api.inference import InferenceResult, InferenceService, Job, Routed
from scheduler.cluster import runtime
from scheduler.config import WattlaneConfig

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 5.0


class KindRouter:
    """Model choice for an explicit id, and for "auto" the smallest model of the endpoint's kind."""

    def __init__(self, config: WattlaneConfig):
        self.config = config

    def route(self, job: Job) -> Routed:
        kind = "chat" if job.endpoint == "chat" else "completion"
        if job.model != "auto":
            m = self.config.model(job.model)
            if m is None:
                raise ApiError(404, f"The model '{job.model}' does not exist. Known models: "
                                    f"{', '.join(['auto'] + [x.id for x in self.config.models])}",
                               param="model", code="model_not_found")
            if m.kind != kind:
                other = "/v1/completions" if m.kind == "completion" else "/v1/chat/completions"
                raise ApiError(400, f"model '{m.id}' is a {m.kind} model; send this request to {other} "
                                    f"or choose a {kind} model", param="model", code="wrong_model_kind")
            return Routed(model=m.id, reason="requested by id", candidates=[m.id])
        candidates = [m for m in self.config.models_by_size() if m.kind == kind]
        if not candidates:
            raise ApiError(400, f"no {kind} model is configured for model 'auto'", param="model", code="no_candidate")
        return Routed(model=candidates[0].id, reason=f"auto: smallest {kind} model", candidates=[m.id for m in candidates])


class Gateway:
    def __init__(self, config: dict[str, Any], state_dir: str, model_handles: dict[str, Any]):
        runtime.configure_process_logging()
        self.config = WattlaneConfig.model_validate(config)
        self.state_dir = Path(state_dir)
        self.model_handles = model_handles
        self.started_s = int(time.time())
        self.router = KindRouter(self.config)
        self.service = InferenceService(self)
        self._waiting: dict[str, int] = {}

    def __serve_build_asgi_app__(self):
        from scheduler.api.app import create_app

        return create_app(self)

    # --- readiness ------------------------------------------------------------------------------
    async def check_ready(self) -> tuple[bool, list[str]]:
        async def probe(model_id: str, handle: Any) -> str | None:
            try:
                await asyncio.wait_for(handle.ready.remote(), timeout=READY_TIMEOUT_SECONDS)
                return None
            except Exception as exc:
                return f"{model_id}: {type(exc).__name__}"

        results = await asyncio.gather(*(probe(m, h) for m, h in self.model_handles.items()))
        problems = [r for r in results if r]
        return not problems, problems

    # --- accounting hooks -----------------------------------------------------------------------
    def carbon_for(self, energy: dict[str, Any], t_s: float) -> dict[str, Any] | None:
        return None

    async def record(self, job: Job, result: InferenceResult, status: str) -> None:
        log.info("%s %s model=%s tokens=%d+%d status=%s", job.request_id, job.endpoint, result.model,
                 result.prompt_tokens, result.completion_tokens, status)

    def metrics_waiting(self, model: str, delta: int) -> None:
        self._waiting[model] = self._waiting.get(model, 0) + delta
