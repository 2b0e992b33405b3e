"""Schema-driven fuzz of the simulated fleet served through the real gateway: 1,000 cases, no 5xx, as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scheduler.api.auth import hash_key
from tests.support.fuzz import INFERENCE_PATHS, fuzz
from tests.support.served import served

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEYS = {"client": "fuzz-client-key", "reader": "fuzz-reader-key", "operator": "fuzz-operator-key"}


def test_schema_fuzz_simulated_fleet(tmp_path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    cfg["server"]["host"] = "127.0.0.1"
    cfg["server"]["api_keys"] = [{"id": f"{role}-key", "key_sha256": hash_key(key), "role": role}
                                 for role, key in KEYS.items()]
    with served(cfg, tmp_path) as srv:
        stats = fuzz(srv.url, KEYS, max_examples=1000)
    assert stats.cases == 1000
    for path in INFERENCE_PATHS:
        assert stats.ok_by_path[path] >= 20, (path, stats.ok_by_path)
