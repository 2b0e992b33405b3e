"""Health of one upstream endpoint: ejection after failures, re-admission by health check with exponential backoff.

EndpointHealth is the state (thread-safe); HealthChecker probes the endpoint in a thread of its own
(`/health`, else `/v1/models`) every period. A failed request ejects at once; health checks eject
after HEALTH_FAILURES_TO_EJECT failures in a row, since one slow answer from a busy server is not an
outage. While out, the endpoint is probed only once its backoff has passed; each failed probe
doubles the backoff (up to the configured maximum), the first good one re-admits it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import httpx

from scheduler.config import UpstreamOptions

log = logging.getLogger(__name__)

#: consecutive failed health checks that eject an endpoint that is in (a failed request ejects at once)
HEALTH_FAILURES_TO_EJECT = 2


class EndpointHealth:
    """Ejection state of one endpoint: out after a failure, back after a good health check past its backoff.

    Thread-safe: requests report from the replica's event loop, the health checker from its thread.
    """

    def __init__(self, base_seconds: float, max_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.base_seconds, self.max_seconds = base_seconds, max_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._ejected_until: float | None = None
        self._backoff_seconds = base_seconds
        self.reason = ""
        self.ejections = 0

    @property
    def ejected(self) -> bool:
        return self._ejected_until is not None

    def seconds_to_recheck(self) -> float:
        until = self._ejected_until
        return 0.0 if until is None else max(0.0, until - self._clock())

    def failed(self, reason: str) -> bool:
        """Record a failure; True when it ejected the endpoint now (it was in)."""
        with self._lock:
            self.reason = reason
            if self._ejected_until is not None:
                return False
            self._ejected_until = self._clock() + self._backoff_seconds
            self.ejections += 1
            return True

    def probe_due(self) -> bool:
        """An ejected endpoint is probed only once its backoff has passed."""
        return self._ejected_until is None or self._clock() >= self._ejected_until

    def probe(self, ok: bool, reason: str = "") -> str | None:
        """A health check's result: 'readmitted', 'ejected' or None (no change)."""
        with self._lock:
            if ok:
                self._probe_failures = 0
                if self._ejected_until is None:
                    return None
                self._ejected_until = None
                return "readmitted"
            self.reason = reason
            if self._ejected_until is None:
                # one slow answer from a busy server is not an outage; a failed request ejects at once
                self._probe_failures = getattr(self, "_probe_failures", 0) + 1
                if self._probe_failures < HEALTH_FAILURES_TO_EJECT:
                    return None
                self._probe_failures = 0
                self._ejected_until = self._clock() + self._backoff_seconds
                self.ejections += 1
                return "ejected"
            # still failing after its backoff: wait twice as long before the next look
            self._backoff_seconds = min(self._backoff_seconds * 2, self.max_seconds)
            self._ejected_until = self._clock() + self._backoff_seconds
            return None

    def succeeded(self) -> None:
        """A request went through: the next ejection starts again from the base backoff."""
        if self._ejected_until is None and self._backoff_seconds != self.base_seconds:
            with self._lock:
                self._backoff_seconds = self.base_seconds


class HealthChecker(threading.Thread):
    """Probes one endpoint every period (/health, else /v1/models) in its own thread and client."""

    def __init__(self, base_url: str, headers: Mapping[str, str], options: UpstreamOptions, health: EndpointHealth):
        super().__init__(name=f"health-{base_url}", daemon=True)
        self.base_url, self.headers, self.options, self.health = base_url, dict(headers), options, health
        self.stop_event = threading.Event()
        self._path: str | None = None  # the probe path that answered, once known

    def run(self) -> None:
        o = self.options
        with httpx.Client(timeout=o.health_check_timeout_seconds, headers=self.headers) as client:
            while not self.stop_event.wait(o.health_check_period_seconds):
                if not self.health.probe_due():
                    continue
                ok, reason = self._check(client)
                change = self.health.probe(ok, reason)
                if change == "readmitted":
                    log.warning("endpoint %s re-admitted (health check passed)", self.base_url)
                elif change == "ejected":
                    log.warning("endpoint %s ejected: %s", self.base_url, reason)

    def _check(self, client: httpx.Client) -> tuple[bool, str]:
        paths = [self._path] if self._path else ["/health", "/v1/models"]
        reason = ""
        for path in paths:
            try:
                r = client.get(self.base_url + path)
            except httpx.HTTPError as exc:
                return False, f"health check failed: {type(exc).__name__}"
            if r.status_code == 200:
                self._path = path
                return True, ""
            reason = f"health check {path} answered {r.status_code}"
            if r.status_code != 404:
                break
        return False, reason
