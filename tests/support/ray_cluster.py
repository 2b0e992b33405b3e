"""A test's own Ray cluster, started with `ray start --head` as an operator does, and ended without `ray stop`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def ray_env(home: Path) -> dict[str, str]:
    """The environment of a process in the test's cluster: no Wattlane or Ray settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def start_head(temp_dir: Path, gcs_port: int, env: dict[str, str], num_cpus: int = 2) -> None:
    subprocess.run([RAY, "start", "--head", f"--port={gcs_port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)


def stop_cluster(temp_dir: str) -> None:
    """End only this test's cluster (`ray stop` would end every Ray instance on the machine)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()
