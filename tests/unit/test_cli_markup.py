"""Text the CLI did not write (an error, a path, a name) is printed as it is, never read as Rich markup.

Each case here used to lose its bracketed part (`devices: [cpu0]` printed as `devices: `) or end in
rich.errors.MarkupError and exit 1, after the file it reported on was already written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli import _register_all, app

_register_all()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    # a path longer than the default 80 columns would otherwise be wrapped across two lines
    monkeypatch.setenv("COLUMNS", "300")


def run(*args: str):
    r = CliRunner().invoke(app, list(args))
    text = r.stdout + (r.stderr if r.stderr_bytes else "")
    # a crash while printing shows up as an exception CliRunner caught, not as the command's own exit
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.exception, text)
    return r.exit_code, text


def test_a_config_errors_fix_keeps_its_brackets(tmp_path: Path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"models:\n  - id: m\n    kind: chat\n    engine: llamacpp\n"
                   f"    weights: {{path: {tmp_path / 'tiny.gguf'}}}\n    devices: [gpu0]\n")
    code, text = run("check-config", "--config", str(cfg))
    assert code == 2 and "fix: use devices: [cpu0]" in text, text


def test_a_config_key_that_looks_like_a_closing_tag_is_named(tmp_path: Path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('models: []\n"[/x]": 1\n')
    code, text = run("check-config", "--config", str(cfg))
    assert code == 2 and "configuration error:" in text and "[/x]: unknown key" in text, text


def test_keys_errors_show_the_name_given(tmp_path: Path):
    # the keys commands report their errors with exit status 1 (tests/unit/teams/test_team_keys.py)
    code, text = run("keys", "create", "--team", "[red]bad", "--state-dir", str(tmp_path))
    assert code == 1 and "error: team '[red]bad' must be" in text, text
    code, text = run("keys", "revoke", "[/x]", "--state-dir", str(tmp_path))
    assert code == 1 and "error: no run-time key '[/x]'" in text, text


def test_report_errors_and_summary_show_the_text_given(tmp_path: Path):
    from scheduler.energy.ledger import Ledger

    with Ledger(tmp_path):
        pass
    ledger = tmp_path / "ledger.sqlite3"
    code, text = run("report", "--ledger", str(ledger), "--since", "[/x]", "--out", str(tmp_path / "o.csv"))
    assert code == 2 and "--since must be unix seconds or ISO 8601" in text and "not '[/x]'" in text, text
    out = tmp_path / "o[/x].csv"
    code, text = run("report", "--ledger", str(ledger), "--format", "csv", "--out", str(out))
    assert code == 0 and out.is_file() and f"-> {out}" in text, text


def test_route_eval_names_a_bracketed_file(tmp_path: Path):
    code, text = run("route-eval", "--data", str(tmp_path / "[/x].csv"))
    assert code == 2 and f"error: {tmp_path / '[/x].csv'}: file not found" in text, text


def test_deploy_config_names_the_file_it_wrote(tmp_path: Path):
    out = tmp_path / "serve[/x].yaml"
    out.parent.mkdir()
    code, text = run("deploy-config", "--state-dir", "/var/lib/wattlane", "--out", str(out))
    assert code == 0 and out.is_file() and f"wrote {out};" in text, text


def test_simulate_summary_shows_model_and_device_ids_as_they_are(capsys):
    from scheduler.sim.commands import print_summary

    print_summary({
        "requests": 1, "completed": 1, "rejected": 0, "virtual_seconds": 1.0, "wall_seconds": 0.1,
        "energy_joules": 900.0, "energy_per_request_joules": 900.0, "tokens_per_joule": 0.1,
        **{f"{m}_p{q}_seconds": 0.01 for m in ("ttft", "tpot") for q in (50, 90, 99)},
        "slo": {"ttft_seconds": 1.0, "tpot_seconds": 0.1}, "slo_attainment": 1.0, "preemptions": 0, "governor_steps": 0,
        "routing": {"min_quality": 0.5, "requests_by_model": {"[/m]": 1}, "large_model_share": 0.0,
                    "label_accuracy": None, "route_seconds_mean": 0.0, "route_seconds_p99": 0.0},
        "devices": {"[/x]": {"profile": "h100-sxm", "energy_joules": 900.0, "mean_power_watts": 300.0,
                             "min_interval_power_watts": 200.0, "max_interval_power_watts": 400.0,
                             "power_limit_watts_final": 700.0, "locked_clocks_mhz_final": None}},
    })
    out = capsys.readouterr().out
    assert "[/m] 1" in out and "[/x]" in out, out
