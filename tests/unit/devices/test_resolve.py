"""Upstream endpoints name GPUs as nvidia-smi does (index, UUID); the node agent resolves them to its ids or says which is missing."""

from __future__ import annotations

import pytest

from scheduler.cluster.node_agent import NodeAgent
from scheduler.devices.resolve import DeviceNameError, is_node_local_name, resolve_device_names
from scheduler.devices.simulated import SimulatedGpu


def node_devices() -> dict[str, SimulatedGpu]:
    # simulated GPUs in NVML GPUs' place: each has a UUID and the NVML index nvidia-smi would show
    gpus = [SimulatedGpu(f"gpu{i}", "h100-sxm", node="gpu-host-1", nvml_index=i,
                         uuid=f"GPU-a1b2c3d{i}-0000-4000-8000-00000000000{i}") for i in range(4)]
    return {g.device_id: g for g in gpus}


def test_indices_and_uuids_resolve_to_the_agents_ids_in_order():
    devices = node_devices()
    uuid2 = devices["gpu2"].uuid()
    assert resolve_device_names(["3", uuid2, "gpu0"], devices, endpoint="e", node="gpu-host-1") == ["gpu3", "gpu2", "gpu0"]
    # a unique prefix, in any case, as CUDA_VISIBLE_DEVICES allows
    unique = devices["gpu1"].uuid()[:12]
    assert resolve_device_names([unique.lower()], devices, endpoint="e", node="n") == ["gpu1"]


def test_the_nvml_index_not_the_cuda_index_is_what_a_bare_number_means():
    # an agent started under CUDA_VISIBLE_DEVICES=2,3 calls NVML GPU 3 "gpu1"
    devices = {"gpu0": SimulatedGpu("gpu0", "h100-sxm", nvml_index=2), "gpu1": SimulatedGpu("gpu1", "h100-sxm", nvml_index=3)}
    assert resolve_device_names(["3"], devices, endpoint="e", node="n") == ["gpu1"]
    with pytest.raises(DeviceNameError, match=r"GPU index 0 is not a GPU .* 2 \(gpu0\), 3 \(gpu1\)"):
        resolve_device_names(["0"], devices, endpoint="e", node="n")


def test_an_unknown_uuid_names_the_endpoint_the_uuid_and_the_nodes_gpus():
    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.devices, agent.node = node_devices(), "gpu-host-1"
    missing = "GPU-deadbeef-0000-0000-0000-000000000000"
    with pytest.raises(DeviceNameError) as exc:
        agent.resolve_devices(["gpu0", missing], "http://10.0.0.5:8000 of model llama-3.1-8b")
    message = str(exc.value)
    assert "http://10.0.0.5:8000 of model llama-3.1-8b" in message and missing in message
    assert "gpu-host-1" in message and agent.devices["gpu3"].uuid() in message


def test_one_gpu_named_twice_or_an_ambiguous_prefix_is_refused():
    devices = node_devices()
    with pytest.raises(DeviceNameError, match="twice"):
        resolve_device_names(["1", "gpu1"], devices, endpoint="e", node="n")
    with pytest.raises(DeviceNameError, match="several GPUs"):
        resolve_device_names(["GPU-a1b2"], devices, endpoint="e", node="n")


@pytest.mark.parametrize(("name", "local"), [("0", True), ("12", True), ("GPU-8f1e", True), ("gpu0", False),
                                              ("cpu0", False), ("-1", False), ("01", False), ("MIG-1", False)])
def test_which_names_only_the_node_can_resolve(name, local):
    assert is_node_local_name(name) is local


def test_at_start_an_endpoint_gpu_its_node_lacks_stops_with_its_key_and_uuid(tmp_path):
    import yaml

    from scheduler.config import ConfigError, load_config
    from scheduler.devices.resolve import check_endpoint_devices

    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.devices, agent.node = node_devices(), "gpu-host-1"
    missing = "GPU-deadbeef-0000-0000-0000-000000000000"
    endpoints = [{"base_url": "http://127.0.0.1:8000", "served_model_name": "a", "devices": [0, agent.devices["gpu1"].uuid()]},
                 {"base_url": "http://127.0.0.1:8001", "served_model_name": "b", "devices": ["gpu2", missing]}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"id": "up", "kind": "chat", "engine": "openai", "endpoints": endpoints}]}))
    config = load_config(path)
    asked: list[tuple[str, list[str]]] = []

    def resolve(node, names, label):
        asked.append((node, names))
        return agent.resolve_devices(names, label)

    with pytest.raises(ConfigError) as exc:
        check_endpoint_devices(config, ["gpu-host-1"], resolve)
    assert exc.value.key == "models[0] (id up).endpoints[1].devices"
    assert missing in exc.value.message and "http://127.0.0.1:8001 of model up" in exc.value.message
    assert [n for n, _ in asked] == ["gpu-host-1", "gpu-host-1"]  # the first endpoint resolved on the node
    # with several nodes and no node named, the replica's node is known only when Serve places it
    asked.clear()
    check_endpoint_devices(config, ["gpu-host-1", "gpu-host-2"], resolve)
    assert asked == []
