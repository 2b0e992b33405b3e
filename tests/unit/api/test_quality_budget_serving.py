"""routing.quality_budget in the gateway: min_quality held as a window mean over the requests it routes, for the
requests that leave min_quality to the deployment; a caller's own min_quality stays a wall."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scheduler.api.model_selection import ModelSelection
from scheduler.api.serving import Job
from scheduler.config import ConfigError, QualityBudgetConfig, load_config
from scheduler.datafiles import sim_fleet_config
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.routing.quality_budget import MIN_WINDOW_REQUESTS
from scheduler.sim.prompts import held_out_pool
from tests.support.serving import Fleet

SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"
#: below the 0.969 the sim fleet's wall (default_min_quality 0.8888) gives on the held-out prompts, so the
#: budget sends more requests to the small model than the wall would
TARGET = 0.94


def job(rid: str, prompt: str, controls: dict | None = None, key_defaults: dict | None = None) -> Job:
    request = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": prompt}],
                                params=SamplingParams(max_tokens=2))
    return Job(request_id=rid, model="auto", request=request, api_key_id="k", controls=dict(controls or {}),
               key_defaults=dict(key_defaults or {}))


def budget_fleet(tmp_path: Path) -> Fleet:
    config = load_config(sim_fleet_config())
    config.routing.quality_budget = QualityBudgetConfig(target=TARGET)
    return Fleet(tmp_path, config)


def test_the_gateway_holds_the_target_as_a_window_mean_and_departs_from_the_wall_once_the_window_fills(tmp_path):
    prompts = held_out_pool().prompts[:300]

    async def main():
        fleet = budget_fleet(tmp_path)
        try:
            budget = fleet.serving.selection.quality_budget
            wall = fleet.config.routing.default_min_quality
            early = [fleet.serving.select(job(f"r{i}", p)) for i, p in enumerate(prompts[:MIN_WINDOW_REQUESTS - 1])]
            threshold_early = budget.threshold()
            late = [fleet.serving.select(job(f"r{i}", p)) for i, p in enumerate(prompts) if i >= MIN_WINDOW_REQUESTS - 1]
            # the same prompts under the wall, for comparison (a caller's own min_quality, at the wall's value)
            walled = [fleet.serving.select(job(f"w{i}", p, {"min_quality": wall})) for i, p in enumerate(prompts)]
            explained = fleet.serving.explain(job("explained", prompts[-1]))[1]  # the last select's prompt: the same weight
            answered = await fleet.serving.run(job("last", prompts[0]))
            return (early, late, walled, threshold_early, budget.state(), fleet.rows(), answered,
                    fleet.metrics.render()[0].decode(), wall, explained)
        finally:
            await fleet.aclose()

    early, late, walled, threshold_early, state, rows, answered, metrics, wall, explained = asyncio.run(main())
    # until the window holds MIN_WINDOW_REQUESTS, default_min_quality is the wall
    assert threshold_early == wall
    # then the threshold moves below the wall (the target asks for less than the wall gives), so more go small
    assert state["threshold"] < wall
    late_small = sum(r.model == SMALL for r in late) / len(late)
    walled_small = sum(r.model == SMALL for r in walled[len(early):]) / len(late)
    assert late_small > walled_small + 0.05
    assert state["served_mean"] == pytest.approx(TARGET, abs=0.02)
    assert "budget threshold" in late[-1].reason and f"window mean target {TARGET:.2f}" in late[-1].reason
    # route-explain reports the threshold it applied (per request under rank gain-per-joule), not the wall
    assert explained.quality_target == pytest.approx(late[-1].decision.quality_target)
    # a caller's own min_quality is a wall, and stays out of the window
    assert all("budget" not in r.reason and f"target {wall:.2f}" in r.reason for r in walled)
    assert state["window"] == len(prompts) + 1  # the budgeted selects and the one run, not the walled ones
    # the decision reaches the ledger row, and the budget's figures the metrics
    assert answered.routing["reason"].startswith("P(small model adequate)") and "budget threshold" in answered.routing["reason"]
    assert [r["routing_reason"] for r in rows] == [answered.routing["reason"]]
    assert f'wattlane_quality_budget{{figure="target"}} {TARGET}' in metrics
    assert 'wattlane_quality_budget{figure="served_mean"}' in metrics
    assert "wattlane_quality_budget_shed_total 0.0" in metrics


def test_an_api_keys_min_quality_is_a_wall_and_route_explain_does_not_count_in_the_window(tmp_path):
    prompt = held_out_pool().prompts[0]

    async def main():
        fleet = budget_fleet(tmp_path)
        try:
            keyed = fleet.serving.select(job("k1", prompt, key_defaults={"min_quality": 0.5}))
            explained = [fleet.serving.explain(job(f"e{i}", prompt))[1] for i in range(5)]
            return keyed, explained, fleet.serving.selection.quality_budget.state()
        finally:
            await fleet.aclose()

    keyed, explained, state = asyncio.run(main())
    assert "budget" not in keyed.reason and "target 0.50" in keyed.reason
    assert all("budget threshold" in d.reason for d in explained), "explain shows the budget's decision"
    assert state["window"] == 0, "neither the walled request nor the dry runs entered the window"


@pytest.mark.parametrize("budget,key", [("{target: 0.95, window_requests: 10}", "window_requests"),
                                        ("{target: 0.95, rank: cheapest}", "rank"),
                                        ("{target: 0.95, prompt_token_weight: -0.5}", "prompt_token_weight")])
def test_a_bad_quality_budget_is_a_config_error_naming_the_key(tmp_path, budget, key):
    path = tmp_path / "wattlane.yaml"
    path.write_text(Path(sim_fleet_config()).read_text() + "\n# appended\n")
    text = path.read_text()
    assert "routing:" in text
    path.write_text(text.replace("routing:", f"routing:\n  quality_budget: {budget}", 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"routing.quality_budget.{key}" in str(err.value) and str(path) in str(err.value)


def test_the_gateway_budget_takes_its_rank_and_prompt_weight_from_the_config(tmp_path):
    config = load_config(sim_fleet_config())
    config.routing.quality_budget = QualityBudgetConfig(target=TARGET, prompt_token_weight=0.25)
    budget = ModelSelection(config).quality_budget
    assert (budget.rank, budget.prompt_token_weight) == ("gain-per-joule", 0.25)
    config.routing.quality_budget = QualityBudgetConfig(target=TARGET, rank="gain")
    assert ModelSelection(config).quality_budget.rank == "gain"
