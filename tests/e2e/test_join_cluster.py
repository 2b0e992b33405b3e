"""`wattlane serve --address` joins a Ray cluster someone else runs, and leaves it running on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ray_cluster import RAY, ray_env, start_head, stop_cluster
from tests.support.server import free_port

pytestmark = pytest.mark.slow


def test_serve_joins_an_existing_cluster_and_leaves_it_up(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    temp = Path("/tmp") / f"wl-join-{os.getpid()}"
    env = ray_env(home)
    gcs_port = free_port()
    start_head(temp, gcs_port, env)
    try:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "serve", "--address", f"127.0.0.1:{gcs_port}", "--port", str(port),
             "--state-dir", str(tmp_path / "state")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "not ready"
            time.sleep(1)
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["energy"]["joules"] > 0
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        # the cluster was not ours: it is still up
        status = subprocess.run([RAY, "status", f"--address=127.0.0.1:{gcs_port}"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        stop_cluster(str(temp))
