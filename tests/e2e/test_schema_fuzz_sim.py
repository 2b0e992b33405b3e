"""Schema-driven fuzz of the simulated fleet served through the real gateway: 600 cases, no 5xx.

The llama.cpp server's fuzz (tests/integration/test_schema_fuzz.py) runs 1,000 cases over the same API;
this one checks that the simulated engines' path answers bad input the same way, at a little more than half the cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scheduler.api.auth import hash_key
from tests.support.fuzz import INFERENCE_PATHS, fuzz
from tests.support.served import served

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CASES = 600
KEYS = {"client": "fuzz-client-key", "reader": "fuzz-reader-key", "operator": "fuzz-operator-key"}


def test_schema_fuzz_simulated_fleet(tmp_path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    cfg["server"]["host"] = "127.0.0.1"
    cfg["server"]["api_keys"] = [{"id": f"{role}-key", "key_sha256": hash_key(key), "role": role}
                                 for role, key in KEYS.items()]
    with served(cfg, tmp_path) as srv:
        stats = fuzz(srv.url, KEYS, max_examples=CASES)
    assert stats.cases == CASES
    for path in INFERENCE_PATHS:
        assert stats.ok_by_path[path] >= 20, (path, stats.ok_by_path)
