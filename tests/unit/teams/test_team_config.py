"""Teams, limits and budgets in the config: typed, and every mistake a ConfigError naming the key and the fix."""

from __future__ import annotations

import pytest

from scheduler.config import ConfigError, load_config

BASE = """
models:
  - {id: m, kind: chat, engine: simulated, devices: [sim0], engine_options: {profile: llama-3.1-8b}}
devices: {nvml: false, cpu: false, simulated: [{id: sim0, profile: h100-sxm}]}
"""
KEY = "{id: bot, key_sha256: " + "a" * 64


def load(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(BASE + text)
    return load_config(p)


def test_without_teams_a_key_s_team_is_a_label_for_reports(tmp_path):
    cfg = load(tmp_path, f"server: {{api_keys: [{KEY}, team: blue}}]}}\n")
    assert cfg.server.api_keys[0].team == "blue" and cfg.team("blue") is None


def test_a_team_with_limits_and_budgets_loads(tmp_path):
    cfg = load(tmp_path, f"""
teams:
  - name: search
    limits: {{requests_per_minute: 600, tokens_per_minute: 200000, concurrent_requests: 32}}
    budgets: [{{energy_joules: 3.6e6, period: day}}, {{gco2e: 500, period: month}}]
    when_low: downgrade
    downgrade_min_quality: 0.5
server:
  gateway_replicas: 2
  api_keys: [{KEY}, team: search, limits: {{requests_per_minute: 60}}}}]
""")
    team = cfg.team("search")
    assert team.limits.requests_per_minute == 600 and [b.quantity for b in team.budgets] == ["energy_joules", "gco2e"]
    assert cfg.server.api_keys[0].team == "search" and cfg.server.gateway_replicas == 2


@pytest.mark.parametrize("text, key, words", [
    (f"teams: [{{name: search}}]\nserver: {{api_keys: [{KEY}, team: nobody}}]}}\n", "server.api_keys[0] (id bot).team",
     "add the team under teams"),
    ("teams: [{name: a}, {name: a}]\n", "teams[1].name", "appears twice"),
    ("teams: [{name: a, budgets: [{energy_joules: 1, gco2e: 1}]}]\n", "teams[0].budgets[0]", "exactly one of"),
    ("teams: [{name: a, budgets: [{energy_joules: 1, period: week}]}]\n", "teams[0].budgets[0].period", "'day'"),
    ("teams: [{name: a, when_low: downgrade}]\n", "teams[0]", "downgrade_min_quality"),
    ("teams: [{name: a, limits: {requests_per_minute: 0}}]\n", "teams[0].limits.requests_per_minute", "greater than"),
    ("teams: [{name: a, limits: {rpm: 5}}]\n", "teams[0].limits.rpm", "unknown key"),
    ("teams: [{name: 'a team'}]\n", "teams[0].name", "pattern"),
    ("server: {gateway_replicas: 0}\n", "server.gateway_replicas", "greater than"),
])
def test_mistakes_name_the_key_and_the_fix(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.key == key, str(info.value)
    assert words in str(info.value) and "fix:" in str(info.value)
