"""Wattlane node names from Ray nodes, and which node's agent owns each simulated GPU."""

from __future__ import annotations

from scheduler.cluster.runtime import ClusterNode, node_from_ray, simulated_owners
from scheduler.config import WattlaneConfig


def _config(sim_nodes: list[str]) -> WattlaneConfig:
    sims = [{"id": f"sim-{i}", "profile": "h100-sxm", "node": n} for i, n in enumerate(sim_nodes)]
    return WattlaneConfig.model_validate({
        "models": [{"id": "m", "kind": "chat", "engine": "simulated", "devices": [s["id"] for s in sims],
                    "replicas": len(sims), "engine_options": {"profile": "llama-3.1-8b"}}],
        "devices": {"nvml": False, "cpu": False, "simulated": sims},
    })


def test_node_named_by_its_wattlane_resource_else_by_host():
    named = node_from_ray({"NodeID": "n1", "NodeManagerHostname": "host1", "Alive": True,
                           "Resources": {"CPU": 1.0, "wattlane_node_gpu-box-2": 1.0}})
    assert (named.name, named.named, named.is_head) == ("gpu-box-2", True, False)
    head = node_from_ray({"NodeID": "n0", "NodeManagerHostname": "host1", "Alive": True,
                          "Resources": {"CPU": 2.0, "node:__internal_head__": 1.0}})
    assert (head.name, head.named, head.is_head) == ("host1", False, True)


def test_simulated_gpus_live_on_their_named_node_and_are_absent_while_it_is():
    nodes = [ClusterNode("0", "a", True, True), ClusterNode("1", "b", False, True)]
    owners = simulated_owners(_config(["a", "b", "c"]), nodes)
    assert owners == {"sim-0": "a", "sim-1": "b"}  # node c has not joined: its GPU is nowhere yet


def test_without_named_nodes_the_head_owns_every_simulated_gpu():
    nodes = [ClusterNode("1", "worker-host", False, False), ClusterNode("0", "head-host", True, False)]
    assert set(simulated_owners(_config(["sim-node0", "sim-node0"]), nodes).values()) == {"head-host"}
