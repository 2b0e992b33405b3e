"""Schema-driven fuzz of the embedded default (real llama.cpp models): 1,000 cases, no 5xx, every answer as documented."""

from __future__ import annotations

from tests.support.fuzz import INFERENCE_PATHS, fuzz
from tests.support.server import KEYS


def test_schema_fuzz_llamacpp(server) -> None:
    stats = fuzz(server.url, KEYS, max_examples=1000)
    assert stats.cases == 1000
    # the steering reaches the successful path on every inference endpoint, not only the error paths
    for path in INFERENCE_PATHS:
        assert stats.ok_by_path[path] >= 20, (path, stats.ok_by_path)
    assert sum(n for (_, s), n in stats.by_path_status.items() if 400 <= s < 500) >= 100, stats.by_path_status
