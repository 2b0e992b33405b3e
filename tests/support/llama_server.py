"""Real OpenAI-compatible upstream servers for tests: llama-cpp-python's own server on the installed GGUF models.

`python -m llama_cpp.server` (llama-cpp-python's [server] extra) in a child process on a free
loopback port; stop() terminates it (kill() is the crash the fault tests need). No network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scheduler.config import load_config
from scheduler.weights import resolve_weights
from tests.support.server import free_port

SMOL_ID, GEMMA_ID = "smollm2-135m-instruct", "gemma-3-270m"
#: llama.cpp's batch size for the prompt. LLAMA_SERVER_N_BATCH overrides it: a build whose batched
#: kernels fault on the machine at hand (an AMX build in a VM without AMX state) still runs with 1
N_BATCH = int(os.environ.get("LLAMA_SERVER_N_BATCH", "512"))


def model_file(model_id: str, cache_dir: Path) -> Path:
    """The GGUF file of one of the embedded default's models (gemma is assembled into cache_dir once)."""
    cfg = load_config(None)
    model = cfg.model(model_id)
    assert model is not None
    return resolve_weights(model, cfg, cache_dir=cache_dir)


@dataclass
class LlamaServer:
    model_path: Path
    alias: str
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "LlamaServer":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", "1", "--n_threads_batch", "1",
               "--n_ctx", "2048", "--n_batch", str(N_BATCH), "--n_ubatch", str(N_BATCH), "--verbose", "False",
               # by default this server stops a running stream whenever another request (a health check's
               # GET /v1/models included) arrives; a server in production must finish what it accepted
               "--interrupt_requests", "False"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout_s:g} s; see {self.log_path}")

    def kill(self) -> None:
        """The crash: SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def requests_served(self) -> int:
        """POSTs the server logged as answered (uvicorn's access log)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(1 for line in text.splitlines() if '"POST /v1/' in line and " 200" in line)
