"""The built wheel alone, installed away from the checkout, runs `wattlane simulate --model auto`, and stays small."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the wheel holds code, the predictor (~0.8 MB: two heads of float16 weights), the trace (~0.2 MB) and the held-out prompts (~0.3 MB)
MAX_WHEEL_BYTES = 2_000_000
PACKAGED = (
    "scheduler/data/azure-llm-2023-conv.csv.gz",
    "scheduler/data/routing-held-out.csv.gz",
    "scheduler/data/README.md",
    "scheduler/default_configs/sim-fleet.yaml",
    "scheduler/routing/artefacts/adequacy.npz",
    "scheduler/sim/data/models.json",
)


def _run(cmd, cwd, env, timeout):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_installed_wheel_simulates_with_its_own_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # build from a copy: setuptools reuses an existing build/ folder, which can hold files deleted since
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "state", ".state"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)], tmp_path, env, 600)
    (wheel,) = dist.glob("wattlane-*.whl")
    size = wheel.stat().st_size
    assert size < MAX_WHEEL_BYTES, f"{wheel.name} is {size} bytes"
    names = zipfile.ZipFile(wheel).namelist()
    assert set(PACKAGED) <= set(names)
    # repository tools and their data stay out of the package
    assert not [n for n in names if n.split("/")[0] in ("benchmarks", "data", "tests", "docs", "configs")]

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)], tmp_path, env, 300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["PYTHONPATH"] = str(site)  # dependencies come from this interpreter's site-packages, the code from the wheel
    where = _run([sys.executable, "-c", "import json, scheduler, sys; print(scheduler.__file__); print(json.dumps(sys.path))"],
                 work, env, 60)
    module_file, path_json = where.stdout.splitlines()[:2]
    # the checkout itself is not importable (the venv may live inside it: only its site-packages may appear)
    assert module_file.startswith(str(site)) and str(REPO) not in json.loads(path_json)

    trace = site / "scheduler" / "data" / "azure-llm-2023-conv.csv.gz"
    out = work / "out.json"
    # no --config: the packaged simulated fleet; two minutes of the trace keep it short
    _run([sys.executable, "-m", "scheduler", "simulate", "--trace", str(trace), "--model", "auto", "--minutes", "2",
          "--json", str(out)], work, env, 300)
    s = json.loads(out.read_text())
    assert s["settings"]["config"].startswith(str(site))
    assert s["requests"] > 300 and s["completed"] > 0.9 * s["requests"]
    r = s["routing"]
    assert 0.0 < r["large_model_share"] < 1.0 and sum(r["requests_by_model"].values()) == s["requests"] - s["rejected"]
    assert "routing-held-out.csv.gz" in r["prompts"]
