"""`wattlane serve` in a child process for tests: a config written to a temp folder, wait until ready, stop with Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.server import free_port


@dataclass
class ServedProcess:
    url: str
    state_dir: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def served(config: dict[str, Any], workdir: Path, *, ready_timeout_s: float = 240,
           log_path: Path | None = None) -> Iterator[ServedProcess]:
    """Serve `config` (a parsed YAML dict) until the block ends; the server must then stop cleanly (exit 0).

    log_path: write the server's output there instead of a pipe (a long run's logs would fill the pipe)."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(WATTLANE_STATE_DIR=str(workdir / "state"), PYTHONUNBUFFERED="1")
    out_file = open(log_path, "w") if log_path is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--config", str(path), "--port", str(port)],
                            env=env, stdout=out_file or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if out_file is not None:
        out_file.close()

    def output() -> str:
        return log_path.read_text(errors="replace") if log_path is not None else proc.stdout.read()

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"wattlane serve exited with {proc.returncode}:\n{output()}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError("wattlane serve was not ready in time")
            time.sleep(0.25)
        yield ServedProcess(url=url, state_dir=workdir / "state", proc=proc)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out if log_path is None else output()[-5000:]
