"""Discrete-event replay: deterministic, hooks plug in, bad inputs give clear errors, CLI writes the JSON keys."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scheduler.config import load_config
from scheduler.devices.base import Device
from scheduler.sim.fleet import FleetSimulator, ReplayTooLongError
from scheduler.sim.physics import idle_power_watts
from scheduler.sim.profiles import gpu_profile
from scheduler.datafiles import sim_fleet_config
from scheduler.sim.trace import Trace, TraceError, load_trace

CONFIG = sim_fleet_config()


def _trace(tmp_path: Path, n=60, seconds=30.0) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        t = i * seconds / n
        lines.append(f"2023-11-16 18:00:{int(t):02d}.{int((t % 1) * 1e6):06d},{200 + 37 * (i % 11)},{20 + 13 * (i % 7)}")
    p = tmp_path / "trace.csv"
    p.write_text("\n".join(lines))
    return p


def test_replay_is_deterministic_and_complete(tmp_path):
    trace = load_trace(_trace(tmp_path))
    a = FleetSimulator(load_config(CONFIG), seed=3).run(trace).summary()
    b = FleetSimulator(load_config(CONFIG), seed=3).run(trace).summary()
    assert a["completed"] == 60 and a["rejected"] == 0
    for k in ("energy_joules", "ttft_p99_seconds", "tpot_p99_seconds"):
        assert a[k] == b[k]
    # conservation: the fleet's energy is its GPUs' energy; each GPU drew at least execution-idle
    # power at its lowest clock and never more than its power limit, for the whole run
    devices = a["devices"]
    assert len(devices) == 8
    assert a["energy_joules"] == pytest.approx(sum(d["energy_joules"] for d in devices.values()), rel=1e-9)
    for d in devices.values():
        gpu = gpu_profile(d["profile"])
        floor_watts = idle_power_watts(gpu, model_loaded=True, max_clock_mhz=gpu.sm_clock_min_mhz)
        assert floor_watts * a["virtual_seconds"] <= d["energy_joules"] <= d["power_limit_watts_final"] * a["virtual_seconds"]
    assert 0 <= a["slo_attainment"] <= 1


def test_placement_and_governor_hooks_see_stats_and_devices(tmp_path):
    trace = load_trace(_trace(tmp_path))
    seen = {"place": 0, "step": 0}

    def place(request, replicas):
        seen["place"] += 1
        assert request.prompt_tokens_hint > 0 and all("decode_seconds_per_token" in r for r in replicas)
        return min(range(len(replicas)), key=lambda i: (replicas[i]["model_id"] != "llama-3.1-8b", replicas[i]["running"]))

    class Gov:
        def __init__(self, config, devices, clock):
            assert all(isinstance(d, Device) for d in devices.values())
            self.devices = devices

        def step(self, now_s, stats_by_device):
            seen["step"] += 1
            assert set(stats_by_device) == set(self.devices)
            if seen["step"] == 1:
                for d in self.devices.values():
                    d.set_power_limit_watts(250)

    # placement-only: the hook chooses among every replica of every model (no model selection)
    capped = FleetSimulator(load_config(CONFIG), placement=place, governor_factory=Gov, auto_selection="placement-only").run(trace).summary()
    free = FleetSimulator(load_config(CONFIG), placement=place, auto_selection="placement-only").run(trace).summary()
    assert seen["place"] == 120 and seen["step"] >= 30
    assert capped["replicas"]["llama-3.1-70b#0"]["completed"] == 0
    assert capped["energy_joules"] < free["energy_joules"]
    assert capped["ttft_p99_seconds"] > free["ttft_p99_seconds"]


def test_bad_trace_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,12,x\n")
    with pytest.raises(TraceError, match="line 2: GeneratedTokens"):
        load_trace(p)
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.csv")


def test_cli_writes_json_and_reports_errors_without_traceback(tmp_path):
    from scheduler.cli import _register_all, app

    _register_all()
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["simulate", "--trace", str(_trace(tmp_path)), "--config", str(CONFIG), "--json", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    for key in ("requests", "energy_per_request_joules", "tokens_per_joule", "ttft_p99_seconds", "tpot_p99_seconds", "slo_attainment", "timeline"):
        assert key in data
    assert data["method"] == "simulated" and data["requests"] == 60
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = CliRunner().invoke(app, ["simulate", "--trace", str(bad), "--config", str(CONFIG)])
    assert r.exit_code == 2 and "missing column" in r.output and "Traceback" not in r.output


def test_a_model_the_fleet_does_not_have_is_refused_not_replayed_as_all_rejected(tmp_path):
    """`simulate --model nope` used to replay the whole trace, reject every request and print the fleet's
    idle energy as 'energy per request'."""
    from scheduler.cli import _register_all, app

    _register_all()
    r = CliRunner().invoke(app, ["simulate", "--trace", str(_trace(tmp_path)), "--config", str(CONFIG), "--model", "nope"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "'nope' is not a model of" in r.output and "llama-3.1-8b" in r.output
    with pytest.raises(ValueError, match="'nope' is not one of the config's models"):
        FleetSimulator(load_config(CONFIG), model="nope")
    ok = CliRunner().invoke(app, ["simulate", "--trace", str(_trace(tmp_path)), "--config", str(CONFIG), "--model", "llama-3.1-8b"])
    assert ok.exit_code == 0 and "60 / 0" in ok.output


def test_a_replay_that_completes_nothing_has_no_energy_per_request(tmp_path):
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [f"2023-11-16 18:00:0{i}.000000,900000,20" for i in range(5)]
    (tmp_path / "huge.csv").write_text("\n".join(lines))
    s = FleetSimulator(load_config(CONFIG)).run(load_trace(tmp_path / "huge.csv")).summary()
    assert s["completed"] == 0 and s["rejected"] == 5 and s["energy_joules"] > 0
    assert s["energy_per_request_joules"] is None


def test_unknown_profile_is_a_config_error(tmp_path):
    from scheduler.config import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.read_text().replace("profile: llama-3.1-70b", "profile: llama-9-999b"))
    with pytest.raises(ConfigError, match="unknown model profile"):
        FleetSimulator(load_config(cfg))


def test_cli_defaults_are_the_packaged_trace_and_fleet(tmp_path, monkeypatch):
    from scheduler import datafiles
    from scheduler.cli import _register_all, app

    _register_all()
    monkeypatch.chdir(tmp_path)  # nothing of the checkout is reachable by a relative path
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["simulate", "--minutes", "0.2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["settings"]["trace"] == str(datafiles.conversation_trace())
    assert data["settings"]["config"] == str(datafiles.sim_fleet_config())
    assert data["requests"] > 10 and data["routing"]["requests_by_model"]


def test_a_simulated_governor_leaves_no_state_directory_behind(tmp_path):
    """`wattlane bench fleet` makes a governor per replay; each used to leave its settings store in /tmp."""
    import gc

    from scheduler.sim.hooks import resolve_governor

    trace = load_trace(_trace(tmp_path, n=20))
    made: list[Path] = []

    def governor(cfg, devices, clock):
        gov = resolve_governor(cfg, devices, clock, policy="slo-feedback",
                               options={"tpot_slo_seconds": 0.1, "ttft_slo_seconds": 1.0})
        made.append(gov.actuator.saved_path.parent.parent)  # <state>/power/<file>
        return gov

    summary = FleetSimulator(load_config(CONFIG), governor_factory=governor).run(trace).summary()
    assert summary["completed"] == 20 and len(made) == 1 and made[0].name.startswith("wattlane-sim-power-")
    gc.collect()
    assert not made[0].exists()


def _simulate(tmp_path, *args):
    from scheduler.cli import _register_all, app

    _register_all()
    return CliRunner().invoke(app, ["simulate", "--trace", str(_trace(tmp_path, n=6, seconds=3.0)), "--config", str(CONFIG), *args])


@pytest.mark.parametrize("args, option", [
    # 0, negative and nan used to hang (speedup 0, timeline -5), divide by zero (timeline 0), replay nothing
    # (minutes 0 / -1), the whole trace (minutes nan), or turn every figure nan (speedup -1 / nan), all with exit 0
    (["--speedup", "0"], "--speedup"), (["--speedup", "-1"], "--speedup"), (["--speedup", "nan"], "--speedup"),
    (["--speedup", "inf"], "--speedup"), (["--minutes", "0"], "--minutes"), (["--minutes", "-1"], "--minutes"),
    (["--minutes", "nan"], "--minutes"), (["--timeline-interval", "0"], "--timeline-interval"),
    (["--timeline-interval", "-5"], "--timeline-interval"), (["--timeline-interval", "nan"], "--timeline-interval"),
    # 0 used to mean "the config's SLO"; -5 and nan were a RequestControlError traceback
    (["--slo-ttft-ms", "0"], "--slo-ttft-ms"), (["--slo-ttft-ms", "-5"], "--slo-ttft-ms"), (["--slo-tpot-ms", "nan"], "--slo-tpot-ms"),
    (["--seed", "-1"], "--seed"),
])
def test_run_values_that_are_not_positive_and_finite_are_usage_errors(tmp_path, args, option):
    r = _simulate(tmp_path, *args)
    assert r.exit_code == 2 and option in r.output and "Traceback" not in r.output, r.output


def test_a_replay_that_would_never_end_is_refused(tmp_path):
    # speedup 1e-300 stretched the arrivals past 1e290 s: timeline samples forever
    r = _simulate(tmp_path, "--speedup", "1e-300")
    assert r.exit_code == 2 and "timeline samples" in r.output and "raise --speedup" in r.output, r.output
    r = _simulate(tmp_path, "--timeline-interval", "1e-9")
    assert r.exit_code == 2 and "2.5e+09 timeline samples" in r.output, r.output
    # one arrival spans nothing, but sampling runs on while the fleet drains
    one = Trace(np.zeros(1), np.array([500]), np.array([200]))
    with pytest.raises(ReplayTooLongError, match="still draining"):
        FleetSimulator(load_config(CONFIG), timeline_interval_seconds=1e-6, auto_selection="placement-only").run(one)
    with pytest.raises(ValueError, match="slo_ttft_seconds must be a positive finite"):
        FleetSimulator(load_config(CONFIG), slo_ttft_seconds=0.0)
    with pytest.raises(ValueError, match="timeline_interval_seconds must be a positive finite"):
        FleetSimulator(load_config(CONFIG), timeline_interval_seconds=float("nan"))


@pytest.mark.parametrize("args, message", [
    (["--power-policy", "nosuch"], "unknown policy 'nosuch'; choose one of none, static"),
    (["--power-policy", "budget", "--power-option", "budget_watts=-5"], "budget_watts: Input should be greater than 0"),
    (["--power-policy", "static", "--power-option", "foo=1"], "unknown option for policy 'static'"),
    (["--placement", "os:path"], "'os:path' is a module, not a place(request, replicas) callable"),
    # options without a policy applied to nothing, silently
    (["--power-option", "budget_watts=500"], "--power-option needs --power-policy"),
])
def test_hooks_and_power_policies_that_do_not_resolve_are_clear_errors(tmp_path, args, message):
    r = _simulate(tmp_path, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_a_trace_named_gz_that_is_not_gzip_is_a_trace_error(tmp_path):
    p = tmp_path / "t.csv.gz"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,10\n")
    with pytest.raises(TraceError, match=rf"{p}: cannot read the trace \(BadGzipFile"):
        load_trace(p)


def test_a_json_path_that_cannot_be_written_is_refused_before_the_replay(tmp_path, monkeypatch):
    import scheduler.sim.commands as commands

    monkeypatch.setattr(commands, "run_simulation", lambda *a, **k: pytest.fail("replayed before checking --json"))
    for path in (tmp_path, tmp_path / "trace.csv" / "r.json"):
        r = _simulate(tmp_path, "--json", str(path))
        assert r.exit_code == 2 and f"error: --json {path}" in r.output and "Traceback" not in r.output, r.output


def _model_trace(tmp_path: Path, models: list[str]) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens,Model"] + [f"{i * 0.5},{300 + i},{20 + i},{m}" for i, m in enumerate(models)]
    p = tmp_path / "models.csv"
    p.write_text("\n".join(lines))
    return p


def test_an_explicit_model_wins_over_the_trace_model_column(tmp_path):
    trace = load_trace(_model_trace(tmp_path, ["llama-3.1-70b"] * 4))
    from_trace = FleetSimulator(load_config(CONFIG)).run(trace).summary()
    assert from_trace["routing"]["requests_by_model"] == {"llama-3.1-8b": 0, "llama-3.1-70b": 4}
    given = FleetSimulator(load_config(CONFIG), model="llama-3.1-8b").run(trace).summary()
    assert given["completed"] == 4 and given["routing"]["requests_by_model"] == {"llama-3.1-8b": 4, "llama-3.1-70b": 0}


def test_a_trace_model_the_fleet_lacks_is_refused_unless_model_overrides_it(tmp_path):
    """Such a request used to be rejected silently: completed / rejected 0 / 1, exit 0."""
    from scheduler.cli import _register_all, app

    _register_all()
    path = _model_trace(tmp_path, ["llama-3.1-8b", "gpt-4", "auto", "nope"])
    r = CliRunner().invoke(app, ["simulate", "--trace", str(path), "--config", str(CONFIG)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "'gpt-4', 'nope'" in r.output and "llama-3.1-8b, llama-3.1-70b" in r.output
    ok = CliRunner().invoke(app, ["simulate", "--trace", str(path), "--config", str(CONFIG), "--model", "auto"])
    assert ok.exit_code == 0 and "4 / 0" in ok.output, ok.output
