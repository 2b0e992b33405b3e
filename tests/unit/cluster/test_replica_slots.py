"""Which GPU group or endpoint a replica takes from its Serve rank, and the surplus rank Serve hands a
replacement before the replica it replaces has stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.cluster.replica import SurplusReplicaError, check_rank_has_a_slot, devices_for_replica
from scheduler.config import load_config

REPO = Path(__file__).resolve().parents[3]


def test_each_rank_of_a_simulated_model_takes_its_own_gpu_group_and_a_surplus_rank_is_refused():
    model = next(m for m in load_config(REPO / "configs" / "sim-fleet.yaml").models if m.engine == "simulated"
                 and m.replicas > 1)
    for rank in range(model.replicas):
        check_rank_has_a_slot(model, rank)
    assert len({tuple(devices_for_replica(model, r)) for r in range(model.replicas)}) == model.replicas
    # rank `replicas` would wrap onto replica 0's GPUs and leave the replaced replica's GPUs unserved
    with pytest.raises(SurplusReplicaError, match=rf"rank {model.replicas} of model {model.id}.*retries"):
        check_rank_has_a_slot(model, model.replicas)


def test_a_surplus_rank_of_an_upstream_model_is_refused_and_a_local_engine_may_share_its_device():
    config = load_config(REPO / "configs" / "mixed.yaml", check_files=False)
    upstream = next(m for m in config.models if m.engine == "openai")
    check_rank_has_a_slot(upstream, upstream.replicas - 1)
    with pytest.raises(SurplusReplicaError, match="endpoint"):
        check_rank_has_a_slot(upstream, upstream.replicas)
    local = next(m for m in config.models if m.engine == "llamacpp")
    check_rank_has_a_slot(local, local.replicas + 3)  # several llama.cpp replicas may share one CPU
    assert devices_for_replica(local, local.replicas + 3) == [local.devices[0]]
