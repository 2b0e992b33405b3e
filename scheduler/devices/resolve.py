"""Resolve the device names of an upstream endpoint (gpuN, cpu0, an NVML index, a GPU UUID) to its node's device ids.

An operator knows the GPUs a vLLM server runs on by what nvidia-smi shows: an index ("3") or a UUID
("GPU-8f1e..."). The node agent names its GPUs gpu<CUDA index> (scheduler/devices/nvml.py). Only the
agent of the server's node can translate one into the other, so the config checks the names' form
and the agent resolves them when the endpoint's replica starts (NodeAgent.resolve_devices).

A bare index is the GPU's NVML index (nvidia-smi's numbering, which is CUDA's under
CUDA_DEVICE_ORDER=PCI_BUS_ID); a UUID may be abbreviated to a unique prefix, as CUDA_VISIBLE_DEVICES
allows. gpuN and cpu0 are the agent's own ids and pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scheduler.devices.base import Device

#: a device name only the node's agent can resolve: an NVML index or a GPU UUID (or its unique prefix)
NODE_LOCAL_DEVICE_NAME = re.compile(r"^(0|[1-9][0-9]*|GPU-[0-9a-f-]+)$", re.IGNORECASE)


class DeviceNameError(ValueError):
    """An endpoint names a GPU its node does not have; the message names the endpoint and the GPU."""


def is_node_local_name(name: str) -> bool:
    """True for an NVML index or GPU UUID, which only the node's agent can turn into a device id."""
    return bool(NODE_LOCAL_DEVICE_NAME.match(name))


def resolve_device_names(names: Sequence[str], devices: Mapping[str, Device], *, endpoint: str,
                         node: str) -> list[str]:
    """The node's device ids for `names`, in order; DeviceNameError for a name no device of the node has."""
    resolved: list[str] = []
    for name in names:
        if not is_node_local_name(name):
            resolved.append(name)  # gpuN, cpu0: already the agent's id
            continue
        if name.isdigit():
            found = [d for d in devices.values() if getattr(d, "nvml_index", None) == int(name)]
            if not found:
                indexed = sorted(f"{d.nvml_index} ({d.device_id})" for d in devices.values()
                                 if getattr(d, "nvml_index", None) is not None)
                raise DeviceNameError(
                    f"endpoint {endpoint}: GPU index {name} is not a GPU the node agent of {node} meters "
                    f"(its GPUs by NVML index: {', '.join(indexed) or 'none'})")
        else:
            prefix = name.lower()
            found = [d for d in devices.values() if (d.uuid() or "").lower().startswith(prefix)]
            if len(found) != 1:
                known = sorted(f"{d.uuid()} ({d.device_id})" for d in devices.values() if d.uuid())
                what = "matches several GPUs" if found else "is not a GPU of"
                raise DeviceNameError(
                    f"endpoint {endpoint}: GPU UUID {name} {what} node {node} "
                    f"(its GPUs: {', '.join(known) or 'none'})")
        resolved.append(found[0].device_id)
    if len(set(resolved)) != len(resolved):
        raise DeviceNameError(f"endpoint {endpoint}: its devices {', '.join(names)} name one GPU twice on node {node}")
    return resolved


def check_endpoint_devices(config: Any, nodes: Sequence[str],
                           resolve: Callable[[str, list[str], str], list[str]]) -> None:
    """At start: every NVML index and GPU UUID an upstream endpoint names exists on its node.

    nodes: the nodes that have an agent; resolve(node, names, endpoint) asks that node's agent
    (NodeAgent.resolve_devices). An endpoint without a node is checked on the only node when there is
    one (elsewhere its replica's node is known only when Serve places it; the replica resolves it
    then). An endpoint on a node with no agent keeps its names as labels of its estimated energy.
    Raises ConfigError naming the endpoint's key, the endpoint and the GPU its node lacks.
    """
    from scheduler.config_error import ConfigError

    for i, m in enumerate(config.models):
        for j, e in enumerate(m.endpoints):
            if not any(is_node_local_name(d) for d in e.devices):
                continue
            node = e.node or (nodes[0] if len(nodes) == 1 else None)
            if node is None or node not in nodes:
                continue
            try:
                resolve(node, list(e.devices), f"{e.base_url} of model {m.id}")
            except DeviceNameError as exc:
                message = str(getattr(exc, "cause", None) or exc)  # Ray wraps the agent's error; its cause is ours
                raise ConfigError(message, file=config.source_path or "config",
                                  key=f"models[{i}] (id {m.id}).endpoints[{j}].devices",
                                  fix="name GPUs as `nvidia-smi -L` lists them on that node (index or UUID), "
                                      "or run the endpoint's node agent where the server's GPUs are") from None
