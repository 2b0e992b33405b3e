"""docs/benchmarks.md's tables of fleet-bench figures are rendered from the committed results, never copied by hand.

The page once quoted a full set's figures from the run before the one its text described (322 J where the
results said 312 J): the blocks between "<!-- fleet-bench:NAME -->" markers are now rewritten by
`wattlane bench docs` (and `python -m benchmarks.operating_points`), and these tests fail when they drift.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from benchmarks.operating_points import BLOCK as OPERATING_POINTS_BLOCK
from benchmarks.operating_points import RESULTS_PATH as OPERATING_POINTS_PATH
from benchmarks.operating_points import render_block as render_operating_points
from scheduler.datafiles import REPOSITORY_DIR
from scheduler.sim.bench_report import (DOC_BLOCKS, DocBlockError, doc_block, render_ablations, render_doc_blocks,
                                        sync_doc_blocks)

PAGE = REPOSITORY_DIR / "docs" / "benchmarks.md"
FLEET_RESULTS = REPOSITORY_DIR / "docs" / "results" / "fleet-bench" / "fleet-bench.json"


def test_the_benchmarks_page_quotes_the_committed_fleet_results():
    page = PAGE.read_text(encoding="utf-8")
    rendered = render_doc_blocks(json.loads(FLEET_RESULTS.read_text(encoding="utf-8")))
    assert set(rendered) == set(DOC_BLOCKS)
    for name, content in rendered.items():
        assert doc_block(page, name) == content, f"docs/benchmarks.md block {name} is stale: run `wattlane bench docs`"
    points = json.loads(OPERATING_POINTS_PATH.read_text(encoding="utf-8"))
    assert doc_block(page, OPERATING_POINTS_BLOCK) == render_operating_points(points), \
        "docs/benchmarks.md's operating points are stale: run `python -m benchmarks.operating_points`"


def _policy(joules: float, slo: float) -> dict:
    return {"energy_per_request_joules": joules, "slo_attainment": slo}


def test_an_ablation_is_its_energy_against_wattlane_in_every_cell():
    doc = {"settings": {"policies": ["baseline", "wattlane", "wattlane+park", "oracle"], "loads": [1, 2]},
           "cells": {"w@1": {"workload": "w", "load": 1, "policies": {"baseline": _policy(300, 1.0), "wattlane": _policy(200, 0.99),
                                                                      "wattlane+park": _policy(150, 0.995), "oracle": _policy(100, 1.0)}},
                     "w@2": {"workload": "w", "load": 2, "policies": {"wattlane": _policy(100, 0.9), "wattlane+park": _policy(110, 0.8)}}}}
    table = render_ablations(doc).splitlines()
    # one row per ablation: the baseline, the oracle and wattlane itself are none
    assert len(table) == 3 and table[2].startswith("| wattlane+park |")
    assert "-25.0% / +10.0%" in table[2]
    assert "w: 99.50 vs 99.00 / 80.00 vs 90.00" in table[2]


def test_sync_rewrites_only_inside_the_markers_and_names_a_missing_block():
    text = "intro\n<!-- fleet-bench:band -->\nold\ntable\n<!-- /fleet-bench:band -->\nafter\n"
    out = sync_doc_blocks(text, {"band": "new"})
    assert out == "intro\n<!-- fleet-bench:band -->\nnew\n<!-- /fleet-bench:band -->\nafter\n"
    assert sync_doc_blocks(out, {"band": "new"}) == out
    with pytest.raises(DocBlockError, match="<!-- fleet-bench:cells -->"):
        sync_doc_blocks(text, {"cells": "x"})


def test_bench_docs_check_fails_on_a_stale_page_and_passes_once_rewritten(tmp_path):
    from scheduler.cli import _register_all, app

    if not any(getattr(g, "name", None) == "bench" for g in app.registered_groups):
        _register_all()
    page = tmp_path / "benchmarks.md"
    shutil.copy(PAGE, page)
    stale = page.read_text(encoding="utf-8").replace("| wattlane-all | 312 (271 + 41) |", "| wattlane-all | 322 (281 + 41) |")
    assert stale != page.read_text(encoding="utf-8")
    page.write_text(stale, encoding="utf-8")
    runner = CliRunner()
    args = ["bench", "docs", "--results", str(FLEET_RESULTS), "--docs", str(page)]
    res = runner.invoke(app, args + ["--check"])
    assert res.exit_code == 1 and "cells" in res.output
    assert runner.invoke(app, args).exit_code == 0
    assert "| wattlane-all | 312 (271 + 41) |" in page.read_text(encoding="utf-8")
    assert runner.invoke(app, args + ["--check"]).exit_code == 0
    page.write_text("no markers here\n", encoding="utf-8")
    res = runner.invoke(app, args + ["--check"])
    assert res.exit_code == 2 and "fleet-bench:ablations" in res.output
