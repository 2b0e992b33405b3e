"""`wattlane serve` as a user runs it: starts, answers, and on Ctrl-C or kill -9 leaves nothing behind and loses nothing.

These start their own Ray instance in a subprocess, so they run before the shared integration
session (pytest collects tests/e2e first).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.server import free_port

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _ray_descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str, Path, Path]:
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(HOME=str(home), WATTLANE_STATE_DIR=str(state), PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(home / ".cache"))
    proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, home, state
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError("serve did not become ready in 240 s")


def _chat(url: str, n_tokens: int = 4) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": "auto", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": n_tokens})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_ctrl_c_stops_everything_and_writes_nothing_to_home(tmp_path):
    proc, url, home, state = _start(tmp_path)
    children = _ray_descendants(psutil.Process(proc.pid))
    assert children, "Ray and the model replicas run as child processes"
    body = _chat(url)
    energy = body["usage"]["energy"]
    assert energy["joules"] > 0
    # the first request after start-up is not charged the models' loading time: that is start-up energy
    startup = httpx.get(url + "/v1/energy/summary", timeout=30).json()
    print(f"first request {energy}; start-up {startup['startup']}")
    assert startup["startup_joules"] > 0 and {s["device"] for s in startup["startup"]} == {energy["device"]}
    assert energy["idle_joules"] < 0.2 * startup["startup_joules"]
    # just after the ready time the figure may still be the agents' live one (settled false); it settles
    for _ in range(40):
        if all(s["settled"] for s in startup["startup"]):
            break
        time.sleep(0.25)
        startup = httpx.get(url + "/v1/energy/summary", timeout=30).json()
    assert [s["settled"] for s in startup["startup"]] == [True] and startup["startup_joules"] > 0
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
    alive = _wait_gone(children, 30)
    assert not alive, f"left behind: {[p.cmdline()[:3] for p in alive]}"
    assert not _processes_mentioning(str(state)), "processes still reference the state directory"
    # nothing in $HOME: Ray's token, temp files, model cache all live under the state directory
    assert sorted(p.name for p in home.iterdir()) == []
    assert (state / "ledger.sqlite3").exists() and (state / "ray-auth-token").exists()


def test_kill_9_loses_no_finished_request(tmp_path):
    proc, url, _home, state = _start(tmp_path)
    children = _ray_descendants(psutil.Process(proc.pid))
    ids = [_chat(url, 2)["id"] for _ in range(5)]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as an OOM killer or `kill -9 -PGID` would
    proc.wait(timeout=30)
    _wait_gone(children, 30)
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        stored = {r[0] for r in db.execute("SELECT request_id FROM requests")}
    assert set(ids) <= stored
    for p in _ray_descendants(psutil.Process(os.getpid())):
        assert str(state) not in " ".join(p.cmdline())
