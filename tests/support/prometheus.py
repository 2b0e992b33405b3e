"""Run a real Prometheus server (Debian package `prometheus`) in a test, scraping one target.

Usage:
    binary = require_prometheus()        # skips if absent, fails if absent and CI=true
    with PrometheusServer(binary, target="127.0.0.1:9100", work_dir=tmp_path) as prom:
        prom.wait_for('up{job="wattlane"} == 1')
        prom.query('wattlane_requests_total')

The server gets a generated config (scrape every scrape_interval_seconds), storage in work_dir,
its web API on a free loopback port, and is terminated (then killed if need be) on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.server import free_port

DEFAULT_BINARY = "/usr/bin/prometheus"


def prometheus_binary() -> str | None:
    """The Prometheus binary: $WATTLANE_PROMETHEUS_BIN, /usr/bin/prometheus, or one on PATH."""
    for cand in (os.environ.get("WATTLANE_PROMETHEUS_BIN"), DEFAULT_BINARY, shutil.which("prometheus")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def require_prometheus() -> str:
    """The binary, or skip the test; in CI (CI=true) a missing binary fails instead of skipping."""
    import pytest

    binary = prometheus_binary()
    if binary is None:
        msg = "the prometheus binary is missing (install the Debian package: apt-get install -y prometheus)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(
        self,
        binary: str,
        *,
        target: str,
        work_dir: str | os.PathLike[str],
        metrics_path: str = "/metrics",
        job: str = "wattlane",
        scrape_interval_seconds: float = 1.0,
        ready_timeout_seconds: float = 30.0,
    ):
        self.binary = binary
        self.target = target
        self.job = job
        self.work_dir = Path(work_dir)
        self.metrics_path = metrics_path
        self.scrape_interval_seconds = scrape_interval_seconds
        self.ready_timeout_seconds = ready_timeout_seconds
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(timeout=5.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        interval = f"{int(self.scrape_interval_seconds * 1000)}ms"
        return (
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {self.job}\n"
            f"    metrics_path: {self.metrics_path}\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )

    def log_tail(self, n: int = 40) -> str:
        log = self.work_dir / "prometheus.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""

    def start(self) -> "PrometheusServer":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.work_dir / "prometheus.yml"
        cfg.write_text(self._config())
        self.port = free_port()
        log = open(self.work_dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work_dir,
        )
        log.close()
        deadline = time.monotonic() + self.ready_timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._client.get(f"{self.url}/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {self.ready_timeout_seconds} s:\n{self.log_tail()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; returns the result list ([{'metric': {...}, 'value': [t, 'v']}, ...])."""
        r = self._client.get(f"{self.url}/api/v1/query", params={"query": promql})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} failed: {body.get('error', r.text)}")
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a query that returns one series (None if it returns none)."""
        res = self.query(promql)
        if not res:
            return None
        if len(res) > 1:
            raise PrometheusError(f"query {promql!r} returned {len(res)} series, expected one")
        return float(res[0]["value"][1])

    def wait_for(self, promql: str, timeout_seconds: float = 20.0) -> list[dict[str, Any]]:
        """Poll until the query returns a non-empty result (e.g. after the first scrapes)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            res = self.query(promql)
            if res:
                return res
            if time.monotonic() > deadline:
                targets = self._client.get(f"{self.url}/api/v1/targets").json()
                raise PrometheusError(f"no result for {promql!r} after {timeout_seconds} s; targets: {targets}\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._client.close()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
