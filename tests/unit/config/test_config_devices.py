"""Device and profile cross-references: what `check-config` and `serve` reject before Ray starts.

Each case here used to pass `wattlane check-config` and then fail inside Ray Serve (a traceback,
exit 1) or serve wrongly (a llama.cpp replica "ready on gpu7" on a host without that GPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scheduler.config as config_module
from scheduler.config import ConfigError, load_config
from scheduler.sim.profiles import gpu_profiles, model_profiles

LLAMA = """
models:
  - id: tiny
    kind: completion
    engine: llamacpp
    weights: {path: WEIGHTS}
    devices: [DEVICE]
"""

SIM = """
models:
  - id: sim
    kind: chat
    engine: simulated
    devices: [s0]
    replicas: 1
    engine_options: {profile: MODEL_PROFILE}
devices:
  nvml: false
  cpu: false
  simulated:
    - {id: s0, profile: GPU_PROFILE}
"""


def sim(model_profile: str = "llama-3.1-8b", gpu_profile: str = "h100-sxm") -> str:
    return SIM.replace("MODEL_PROFILE", model_profile).replace("GPU_PROFILE", gpu_profile)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.gguf"
    p.write_bytes(b"GGUF")
    return p


def write(tmp_path: Path, text: str, weights: Path | None = None) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text.replace("WEIGHTS", str(weights)) if weights else text)
    return p


BAD = {
    "llamacpp-on-gpu7": (
        LLAMA.replace("DEVICE", "gpu7"), "models[0] (id tiny).devices", "engine 'llamacpp' runs on the CPU"),
    "llamacpp-on-unknown": (
        LLAMA.replace("DEVICE", "tpu0"), "models[0] (id tiny).devices", "'tpu0' is not a known device"),
    "power-group-unknown-device": (
        LLAMA.replace("DEVICE", "cpu0") + "power: {groups: [{name: rack, devices: [cpu0, rack-gpu-9]}]}\n",
        "power.groups[0] (name rack).devices", "unknown device 'rack-gpu-9'"),
    "power-group-gpu-without-nvml": (
        LLAMA.replace("DEVICE", "cpu0") + "devices: {nvml: false}\npower: {groups: [{name: rack, devices: [gpu0]}]}\n",
        "power.groups[0] (name rack).devices", "devices.nvml is false"),
    "device-in-two-groups": (
        LLAMA.replace("DEVICE", "cpu0") + "power: {groups: [{name: a, devices: [gpu0]}, {name: b, devices: [gpu0]}]}\n",
        "power.groups[1] (name b).devices", "already in power group 'a'"),
    "unknown-gpu-profile": (sim(gpu_profile="h900-sxm"), "devices.simulated[0] (id s0).profile", "unknown GPU profile 'h900-sxm'"),
    "unknown-model-profile": (sim(model_profile="llama-9-1t"), "models[0] (id sim).engine_options.profile",
                              "unknown model profile 'llama-9-1t'"),
    "duplicate-simulated-id": (sim() + "    - {id: s0, profile: a100-sxm4}\n", "devices.simulated[1] (id s0).id", "appears twice"),
    "simulated-id-collides-with-nvml": (
        sim().replace("nvml: false", "nvml: true").replace("s0", "gpu0"), "devices.simulated[0] (id gpu0).id", "collides"),
    "too-few-devices-for-replicas": (sim().replace("replicas: 1", "replicas: 2"), "models[0] (id sim).devices", "need 2 devices"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_device_config_is_one_config_error(tmp_path, weights, case):
    text, key, words = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text, weights))
    err = info.value
    assert err.file and err.file.endswith("cfg.yaml")
    assert err.key == key, str(err)
    assert words in str(err)
    assert err.fix


def test_allowed_profiles_come_from_the_profile_data(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, sim(gpu_profile="h900-sxm")))
    assert info.value.fix is not None
    for name in gpu_profiles():  # every profile in scheduler/sim/data/gpus.json, none typed by hand
        assert name in info.value.fix
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, sim(model_profile="llama-9-1t")))
    for key in model_profiles():
        assert key.split("@")[0] in str(info.value)


def test_good_device_configs_load(tmp_path, weights):
    load_config(write(tmp_path, sim()))
    load_config(write(tmp_path, sim(gpu_profile="a100-sxm4")))  # a model profile transferred to another GPU
    # gpuN is checked for its form only: whether it exists is the serving host's business
    cfg = load_config(write(tmp_path, LLAMA.replace("DEVICE", "cpu0") + "power: {groups: [{name: rack, devices: [gpu3]}]}\n", weights))
    with pytest.raises(ConfigError) as info:
        config_module.check_devices_present(cfg, {"cpu0", "gpu0"}, "this host")
    assert info.value.key == "power.groups[0] (name rack).devices"
    assert "device 'gpu3' does not exist on this host; it has 1 NVIDIA GPU(s): gpu0" in str(info.value)
    config_module.check_devices_present(cfg, {"cpu0", "gpu0", "gpu3"}, "this host")


def test_shipped_configs_pass():
    root = Path(__file__).resolve().parents[3] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)


# --- the CLI: exit 2, one clear message, no traceback, nothing started ----------------------------

def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "WATTLANE_STATE_DIR": str(tmp_path / "state")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "scheduler", *args], capture_output=True, text=True, timeout=60, env=env)
    return proc, time.monotonic() - started


def assert_clear_config_error(proc: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert out.count("configuration error:") == 1, out
    assert "fix:" in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert not (tmp_path / "state").exists()  # Ray never started: it would have written here


@pytest.mark.parametrize("case", ["llamacpp-on-gpu7", "power-group-unknown-device", "unknown-gpu-profile",
                                  "unknown-model-profile", "duplicate-simulated-id"])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_cli_rejects_bad_device_config(tmp_path, weights, case, command):
    text, key, _ = BAD[case]
    proc, seconds = run_cli(tmp_path, command, "--config", str(write(tmp_path, text, weights)))
    assert_clear_config_error(proc, tmp_path, "cfg.yaml", key)
    assert seconds < 30


def test_serve_rejects_a_gpu_this_host_lacks(tmp_path, weights):
    text = LLAMA.replace("DEVICE", "cpu0") + "power: {groups: [{name: rack, devices: [gpu63]}]}\n"
    cfg = write(tmp_path, text, weights)
    proc, _ = run_cli(tmp_path, "check-config", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr  # another machine may have gpu63: the file is fine
    proc, seconds = run_cli(tmp_path, "serve", "--config", str(cfg))
    assert_clear_config_error(proc, tmp_path, "power.groups[0] (name rack).devices", "device 'gpu63' does not exist on this host")
    assert seconds < 30


def test_serve_rejects_a_port_in_use(tmp_path, weights):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc, seconds = run_cli(tmp_path, "serve", "--config", str(write(tmp_path, LLAMA.replace("DEVICE", "cpu0"), weights)),
                                "--port", str(port))
    assert_clear_config_error(proc, tmp_path, "server.port", f"port {port} on 127.0.0.1 is already in use", "--port")
    assert seconds < 30
