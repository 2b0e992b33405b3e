"""Savings and teams end to end through the real app (in-process serving on the simulated fleet), and
`wattlane report`, whose figures must equal GET /v1/energy/summary for the same window."""

from __future__ import annotations

import base64
import csv
import io
import re
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler.energy.baseline import SERVED, SIZE_PRIOR
from scheduler.energy.report import FIGURES
from tests.support.gateway_app import bearer, build

SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"
TEAMS = {"client": "research", "operator": "platform"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A gateway that answered five requests from two teams; yields (client, gateway, since, until)."""
    tmp = tmp_path_factory.mktemp("savings")
    app, gw = build(tmp, teams=TEAMS)
    chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6}
    since = time.time() - 1
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json={"model": "auto", "min_quality": 0.0, **chat},
                               headers=bearer("client")).status_code == 200
        assert client.post("/v1/completions", json={"model": "auto", "min_quality": 0.0, "prompt": "Once", "max_tokens": 4},
                           headers=bearer("client")).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": LARGE, **chat}, headers=bearer("operator")).status_code == 200
        until = time.time() + 1
        yield client, gw, since, until
    gw.close()


@pytest.fixture(scope="module")
def cli():
    from scheduler.cli import _register_all, app

    if not any(c.name == "report" for c in app.registered_commands):
        _register_all()
    return app


def test_rows_carry_the_keys_team_and_a_labelled_baseline(served):
    _, gw, _, _ = served
    rows = gw.ledger.requests(limit=None)
    assert len(rows) == 5
    assert {r["team"] for r in rows if r["api_key_id"] == "client-key"} == {"research"}
    small = [r for r in rows if r["model"] == SMALL]
    large = [r for r in rows if r["model"] == LARGE]
    assert len(small) == 4 and len(large) == 1 and large[0]["team"] == "platform"
    # the routed requests ran on the 8B model: their baseline is the 70B, estimated from the size prior
    # (this in-process gateway publishes no live replica figures), and costs more than what they used
    for r in small:
        assert r["baseline_model"] == LARGE and r["baseline_method"] == SIZE_PRIOR
        assert r["baseline_joules"] > r["joules"] > 0
    # a request sent to the baseline model itself saves nothing
    assert large[0]["baseline_method"] == SERVED and large[0]["baseline_joules"] == large[0]["joules"]


def test_summary_by_team_shows_energy_saved_and_export_has_it_per_row(served):
    client, gw, _, _ = served
    r = client.get("/v1/energy/summary", params={"group_by": "team"}, headers=bearer("reader"))
    assert r.status_code == 200, r.text
    teams = {g["team"]: g for g in r.json()["data"]}
    rows = gw.ledger.requests(limit=None)
    research = [x for x in rows if x["team"] == "research"]
    assert teams["research"]["saved_joules"] == pytest.approx(sum(x["baseline_joules"] - x["joules"] for x in research))
    assert teams["research"]["saved_joules"] > 0 and 0 < teams["research"]["saved_fraction"] < 1
    assert teams["platform"]["saved_joules"] == 0.0
    export = list(csv.DictReader(io.StringIO(client.get("/v1/energy/export.csv", headers=bearer("reader")).text)))
    for e in export:
        assert float(e["saved_joules"]) == pytest.approx(float(e["baseline_joules"]) - float(e["joules"]))
    assert {e["team"] for e in export} == {"research", "platform"}


def test_metrics_count_baseline_and_actual_joules_per_model_team_and_key(served):
    client, gw, _, _ = served
    text = client.get("/metrics").text

    def sample(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
        assert m, f"{name}{{{want}}} not in /metrics"
        return float(m.group(1))

    rows = [x for x in gw.ledger.requests(limit=None) if x["team"] == "research"]
    who = {"api_key": "client-key", "model": SMALL, "team": "research"}
    assert sample("wattlane_savings_baseline_joules_total", **who) == pytest.approx(sum(x["baseline_joules"] for x in rows))
    assert sample("wattlane_savings_actual_joules_total", **who) == pytest.approx(sum(x["joules"] for x in rows))


@pytest.mark.parametrize("group_by, route_group", [("team", "team"), ("model", "model"), ("key", "api_key")])
def test_the_reports_figures_equal_the_summary_for_the_same_window(served, cli, tmp_path, group_by, route_group):
    client, gw, since, until = served
    out = tmp_path / "report.csv"
    res = CliRunner().invoke(cli, ["report", "--ledger", str(gw.ledger.path), "--since", repr(since), "--until",
                                   repr(until), "--group-by", group_by, "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = list(csv.DictReader(io.StringIO(out.read_text())))
    summary = client.get("/v1/energy/summary", params={"group_by": route_group, "since": repr(since),
                                                        "until": repr(until)}, headers=bearer("reader")).json()["data"]
    groups = [g for g in got if g["row"] == "group"]
    assert [g[route_group] for g in groups] == [s[route_group] for s in summary]
    for g, s in zip(groups, summary):
        for f in FIGURES:
            assert (g[f] or None) == (None if s[f] is None else repr(s[f]) if isinstance(s[f], float) else str(s[f])), f
    total = next(g for g in got if g["row"] == "total")
    assert int(total["requests"]) == sum(s["requests"] for s in summary) == 5
    assert float(total["saved_joules"]) == pytest.approx(sum(s["saved_joules"] for s in summary))
    # a window that excludes every row reports nothing, not the whole ledger
    res = CliRunner().invoke(cli, ["report", "--ledger", str(gw.ledger.path), "--until", repr(since - 3600),
                                   "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0 and [r["row"] for r in csv.DictReader(io.StringIO(out.read_text()))] == ["total"]


def test_html_report_is_one_self_contained_file_with_png_charts_and_md_writes_them_beside(served, cli, tmp_path):
    _, gw, since, until = served
    html_out = tmp_path / "r.html"
    res = CliRunner().invoke(cli, ["report", "--ledger", str(gw.ledger.path), "--group-by", "team", "--format", "html",
                                   "--out", str(html_out)])
    assert res.exit_code == 0, res.output
    page = html_out.read_text()
    assert "research" in page and "platform" in page and "Saved (estimate)" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    md_out = tmp_path / "r.md"
    res = CliRunner().invoke(cli, ["report", "--ledger", str(gw.ledger.path), "--format", "md", "--out", str(md_out)])
    assert res.exit_code == 0, res.output
    text = md_out.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / link).read_bytes().startswith(b"\x89PNG")
    assert "largest-model/size-prior" in text and "Carbon by source and region" in text


def test_bad_report_options_are_clear_errors(cli, tmp_path):
    res = CliRunner().invoke(cli, ["report", "--ledger", str(tmp_path / "none.sqlite3"), "--out", str(tmp_path / "x.md")])
    assert res.exit_code == 2 and "no ledger at" in res.output
    res = CliRunner().invoke(cli, ["report", "--since", "yesterday", "--out", str(tmp_path / "x.md")])
    assert res.exit_code == 2 and "--since must be unix seconds or ISO 8601" in res.output
    res = CliRunner().invoke(cli, ["report", "--group-by", "hour", "--out", str(tmp_path / "x.md")])
    assert res.exit_code == 2 and "--group-by must be one of team, key, model, device" in res.output


def test_a_report_out_path_that_cannot_be_written_is_a_clear_error(cli, tmp_path):
    """--out naming a folder was an IsADirectoryError traceback, after the ledger had been read."""
    from scheduler.energy.ledger import Ledger, LedgerRow

    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.record(LedgerRow(request_id="r", time_unix_s=time.time(), model=SMALL, device="gpu0", node="n0",
                                status="ok", joules=1.0)).result(timeout=5)
    folder = tmp_path / "reports"
    folder.mkdir()
    res = CliRunner().invoke(cli, ["report", "--ledger", str(tmp_path / "ledger.sqlite3"), "--out", str(folder),
                                   "--format", "csv"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and f"--out {folder} is a folder; name the file to write" in said, said
    assert res.exception is None or isinstance(res.exception, SystemExit)
    (tmp_path / "blocked").write_text("a file where the report's folder would be\n")
    res = CliRunner().invoke(cli, ["report", "--ledger", str(tmp_path / "ledger.sqlite3"), "--out",
                                   str(tmp_path / "blocked" / "r.csv"), "--format", "csv"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and f"cannot write the report to --out {tmp_path / 'blocked' / 'r.csv'}" in said, said


def test_a_file_that_is_no_ledger_is_refused_and_left_as_it_was(cli, tmp_path):
    """`report --ledger` used to give any file our tables (an empty file, another program's database) or
    end in a traceback (a text file: "file is not a database"; a path without a suffix: FileExistsError)."""
    import sqlite3

    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    text, empty, bare = tmp_path / "notes.txt", tmp_path / "empty.sqlite3", tmp_path / "passwd"
    text.write_text("not a database\n")
    empty.write_bytes(b"")
    bare.write_text("root:x:0:0\n")
    for path, words in ((other, "it has no requests table of ours (tables: notes)"), (empty, "(tables: none)"),
                        (text, "file is not a database"), (bare, "file is not a database")):
        before = path.read_bytes()
        res = CliRunner().invoke(cli, ["report", "--ledger", str(path), "--out", str(tmp_path / "x.md")])
        said = " ".join(res.output.split())  # the console wraps long lines
        assert res.exit_code == 2 and f"{path.name} is not a Wattlane ledger" in said and words in said, said
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert path.read_bytes() == before and not (tmp_path / "x.md").exists()


def test_reading_a_ledger_writes_nothing_to_it(served, cli, tmp_path):
    from scheduler.energy.ledger import Ledger, LedgerClosedError, LedgerRow

    _, gw, _, _ = served
    path = gw.ledger.path
    before = sorted(p.name for p in path.parent.iterdir())
    reader = Ledger.for_reading(path)
    assert reader.totals()["requests"] == len(gw.ledger.requests(limit=None)) > 0
    row = LedgerRow(request_id="x", time_unix_s=time.time(), model=SMALL, device="gpu0", node="n0", status="ok",
                    prompt_tokens=1, completion_tokens=1)
    with pytest.raises(LedgerClosedError):
        reader.record(row).result(timeout=5)
    reader.close()
    assert sorted(p.name for p in path.parent.iterdir()) == before
    assert len(gw.ledger.requests(limit=None)) == reader.totals()["requests"]


def one_request(tmp_path, controls: dict, prepare) -> tuple[list[dict], dict]:
    """Run one "auto" chat ("hi", research's key) on the in-process simulated fleet after prepare(fleet); the
    ledger's rows and totals once every row is settled."""
    import asyncio

    from scheduler.api.serving import Job
    from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
    from tests.support.serving import Fleet

    async def main():
        fleet = Fleet(tmp_path)
        prepare(fleet)
        request = GenerationRequest("chatcmpl-1", ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}],
                                    params=SamplingParams(max_tokens=4))
        try:
            await fleet.serving.run(Job(request_id="chatcmpl-1", model="auto", request=request, api_key_id="k",
                                        team="research", controls=controls))
            await fleet.serving.settled()
            return fleet.rows(), fleet.ledger.totals()
        finally:
            await fleet.aclose()

    return asyncio.run(main())


def test_a_cascade_counts_the_request_once_in_the_baseline_and_its_repeat_as_extra_energy(tmp_path):
    from scheduler.energy.baseline import CASCADE_REPEAT

    def cascading(fleet):
        fleet.config.routing.cascade = True  # the simulated engine reports no log-probabilities: it escalates

    rows, totals = one_request(tmp_path, {"priority": "batch", "min_quality": 0.0}, cascading)
    by_id = {r["request_id"]: r for r in rows}
    first, repeat = by_id["chatcmpl-1"], by_id["chatcmpl-1-cascade"]
    assert first["model"] == SMALL and first["baseline_model"] == LARGE and first["baseline_joules"] > first["joules"]
    assert repeat["model"] == LARGE and repeat["team"] == "research"
    assert (repeat["baseline_joules"], repeat["baseline_method"]) == (0.0, CASCADE_REPEAT)
    # one baseline for the one request; both attempts' joules against it
    assert totals["baseline_joules"] == pytest.approx(first["baseline_joules"])
    assert totals["saved_joules"] == pytest.approx(first["baseline_joules"] - first["joules"] - repeat["joules"])


def test_a_retried_request_counts_once_in_the_baseline_and_its_failed_attempt_as_extra_energy(tmp_path):
    """The attempt that timed out gets an "error" row of its own; the baseline deployment would have served the
    request once, so that row's baseline is 0 J (it once got a full baseline too: the request counted twice)."""
    import asyncio

    from scheduler.energy.baseline import RETRIED_ATTEMPT

    def small_model_stalls(fleet):  # the small model takes its prompt, then stalls: its attempt times out
        fleet.config.routing.replica_timeout_seconds = 0.3
        server = fleet.handles[SMALL].server
        real = server.engine.generate

        async def stalls(request):
            async for ev in real(request):
                yield ev
                await asyncio.sleep(3600)

        server.engine.generate = stalls

    rows, totals = one_request(tmp_path, {"min_quality": 0.0}, small_model_stalls)
    by_id = {r["request_id"]: r for r in rows}
    answered, failed = by_id["chatcmpl-1"], by_id["chatcmpl-1-failed-attempt"]
    assert answered["model"] == LARGE and answered["baseline_model"] == LARGE and answered["baseline_joules"] > 0
    assert failed["model"] == SMALL and failed["status"] == "error" and failed["joules"] > 0
    assert (failed["baseline_joules"], failed["baseline_method"]) == (0.0, RETRIED_ATTEMPT)
    assert totals["baseline_joules"] == pytest.approx(answered["baseline_joules"])
    assert totals["saved_joules"] == pytest.approx(answered["baseline_joules"] - answered["joules"] - failed["joules"])
