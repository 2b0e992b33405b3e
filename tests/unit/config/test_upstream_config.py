"""The `openai` engine's configuration: the shipped upstream configs load, and every mistake names its key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scheduler.config import ConfigError, check_upstream_keys, devices_referenced, load_config

REPO = Path(__file__).resolve().parents[3]

ENDPOINT = {"base_url": "http://127.0.0.1:8000", "served_model_name": "m", "devices": ["gpu0"], "server": "vllm"}


def write(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"id": "up", "kind": "chat", "engine": "openai", **model}],
                                    "energy": {"carbon": {"provider": "fixed", "intensity_gco2e_per_kwh": 100}}}))
    return path


def test_the_shipped_upstream_configs_load():
    node = load_config(REPO / "configs" / "vllm-node.yaml")
    small, large = node.models
    assert (small.engine, small.replicas, small.devices) == ("openai", 1, ["gpu0"])
    assert (large.replicas, large.devices) == (1, ["gpu4", "gpu5", "gpu6", "gpu7"])
    assert large.upstream.read_timeout_seconds == 120
    assert set(devices_referenced(node)) == {"gpu0", "gpu4", "gpu5", "gpu6", "gpu7"}
    mixed = load_config(REPO / "configs" / "mixed.yaml")
    assert [m.engine for m in mixed.models] == ["llamacpp", "llamacpp", "openai"]
    # an endpoint on another node is that node's business: this host need not have its GPU
    assert "gpu0" not in devices_referenced(mixed)


def test_each_endpoint_is_a_replica_on_its_own_devices(tmp_path):
    cfg = load_config(write(tmp_path, {"endpoints": [ENDPOINT, {**ENDPOINT, "base_url": "http://10.0.0.2:8000",
                                                                "devices": ["gpu1", "gpu2"]}]}))
    m = cfg.models[0]
    assert m.replicas == 2 and m.devices == ["gpu0", "gpu1", "gpu2"]
    assert m.upstream.estimate_joules_per_output_token is None  # the size prior, unless given


@pytest.mark.parametrize(("model", "key", "words"), [
    ({}, "models[0] (id up)", "needs 'endpoints'"),
    ({"endpoints": [ENDPOINT], "replicas": 3}, "models[0] (id up)", "one replica per endpoint"),
    ({"endpoints": [ENDPOINT], "devices": ["gpu1"]}, "models[0] (id up)", "remove the model's 'devices'"),
    ({"endpoints": [{**ENDPOINT, "base_url": "localhost:8000"}]}, "models[0] (id up).endpoints[0].base_url", "pattern"),
    ({"endpoints": [{**ENDPOINT, "server": "triton"}]}, "models[0] (id up).endpoints[0].server", "vllm"),
    ({"endpoints": [{**ENDPOINT, "api_key": "sk-123"}]}, "models[0] (id up).endpoints[0].api_key", "unknown key"),
    ({"endpoints": [{**ENDPOINT, "api_key_env": "not a name"}]}, "models[0] (id up).endpoints[0].api_key_env",
     "pattern"),
    ({"endpoints": [{k: v for k, v in ENDPOINT.items() if k != "devices"}]}, "models[0] (id up).endpoints[0].devices",
     "required"),
    ({"endpoints": [{**ENDPOINT, "devices": ["tpu0"]}]}, "models[0] (id up).endpoints", "GPU-"),
    ({"endpoints": [{**ENDPOINT, "devices": [-1]}]}, "models[0] (id up).endpoints", "NVML index"),
])
def test_a_mistake_names_its_key(tmp_path, model, key, words):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, model))
    text = f"{exc.value.message} {exc.value.fix}"
    assert exc.value.key == key and words.lower() in text.lower(), (exc.value.key, text)


def test_endpoint_gpus_by_nvml_index_or_uuid_are_left_to_the_node_agent(tmp_path):
    """nvidia-smi's names (index, UUID) pass the config; only the node's agent can check them."""
    uuid = "GPU-5f1c0b2e-1111-2222-3333-444455556666"
    cfg = load_config(write(tmp_path, {"endpoints": [{**ENDPOINT, "devices": [3, uuid, "gpu0"]}]}))
    assert cfg.models[0].endpoints[0].devices == ["3", uuid, "gpu0"]
    # this host's start-up check asks only for the agent's own ids; the rest is resolved on the node
    assert set(devices_referenced(cfg)) == {"gpu0"}
    path = tmp_path / "c.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["devices"] = {"nvml": False}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="devices.nvml is false"):
        load_config(path)


def test_endpoints_on_a_local_engine_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"id": "s", "kind": "chat", "engine": "simulated",
                                                "endpoints": [ENDPOINT]}]}))
    with pytest.raises(ConfigError, match="'endpoints' is for engine 'openai'"):
        load_config(path)


def test_a_missing_api_key_variable_stops_the_start_and_says_which(tmp_path):
    cfg = load_config(write(tmp_path, {"endpoints": [{**ENDPOINT, "api_key_env": "UPSTREAM_KEY"}]}))
    with pytest.raises(ConfigError) as exc:
        check_upstream_keys(cfg, environ={})
    assert exc.value.key == "models[0] (id up).endpoints[0].api_key_env"
    assert "UPSTREAM_KEY" in exc.value.message and "export UPSTREAM_KEY" in exc.value.fix
    check_upstream_keys(cfg, environ={"UPSTREAM_KEY": "secret"})  # set: fine


def test_a_validated_upstream_model_survives_the_round_trip_to_other_processes(tmp_path):
    from scheduler.config import WattlaneConfig

    cfg = load_config(write(tmp_path, {"endpoints": [ENDPOINT, {**ENDPOINT, "devices": ["gpu1"]}]}))
    again = WattlaneConfig.model_validate(cfg.model_dump(mode="json"))  # what replicas and node agents get
    assert again.models[0].replicas == 2 and again.models[0].devices == ["gpu0", "gpu1"]
