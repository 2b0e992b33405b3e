"""The dashboard route: serves a self-contained page, locks it down with CSP, and its method breakdown adds up."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scheduler.api.auth import KeyStore, hash_key
from scheduler.api.errors import install_error_handlers
from scheduler.api.routes import dashboard, energy
from scheduler.config import ApiKeyConfig
from scheduler.energy.ledger import Ledger, LedgerRow

KEYS = {"client": "unit-client-key", "reader": "unit-reader-key", "operator": "unit-operator-key"}
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


async def _no_live_devices() -> None:
    """The reports' gateway here has a ledger and no node agents: no start-up energy to record."""


def make_app(ledger: Ledger | None = None, *, with_keys: bool = True, extra_routers=()) -> FastAPI:
    app = FastAPI()
    app.state.keys = KeyStore([ApiKeyConfig(id=f"{r}-key", key_sha256=hash_key(k), role=r) for r, k in KEYS.items()]
                              if with_keys else [])
    app.state.gateway = SimpleNamespace(ledger=ledger, record_startups=_no_live_devices,
                                            pending_startups=lambda: [])
    install_error_handlers(app)
    app.include_router(dashboard.router)
    app.include_router(energy.router)
    for r in extra_routers:
        app.include_router(r)
    return app


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def row(i: int, **kw) -> LedgerRow:
    base = dict(request_id=f"req-{i}", time_unix_s=T0 + i, model="small", device="cpu0", node="n0", status="ok",
                api_key_id="client-key", prompt_tokens=10, completion_tokens=20, joules=3.0, dynamic_joules=2.0,
                idle_joules=1.0, energy_method="rapl", energy_scope="cpu+dram", gco2e=0.001,
                intensity_gco2e_per_kwh=400.0, pue=1.0, carbon_source="fixed", carbon_region="FRA")
    base.update(kw)
    return LedgerRow(**base)


@pytest.fixture
def ledger(tmp_path: Path):
    lg = Ledger(tmp_path)
    yield lg
    lg.close()


def record_all(ledger: Ledger, rows: list[LedgerRow]) -> None:
    for f in [ledger.record(r) for r in rows]:
        f.result(timeout=5)


# --- the page ---------------------------------------------------------------------------------

def test_dashboard_is_served_without_a_key_even_when_keys_are_configured():
    r = TestClient(make_app()).get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>Wattlane: energy and carbon</title>" in r.text
    # the data calls, not the page, carry the key: nothing in the page is secret
    assert r.headers["referrer-policy"] == "no-referrer"


def test_csp_allows_exactly_the_inline_script_and_style_and_only_same_origin_fetches():
    r = TestClient(make_app()).get("/dashboard")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert csp[f"{tag}-src"] == f"'sha256-{digest}'"


def test_page_is_self_contained():
    html = TestClient(make_app()).get("/dashboard").text
    assert not re.search(r"https?://", html), "no absolute URL of any kind (no CDN, no fonts, no namespaces)"
    assert not re.search(r"""(src|href|action)\s*=\s*["']?//""", html, flags=re.I), "no protocol-relative URL"
    assert not re.search(r"url\(\s*['\"]?(?!#)", html), "CSS/SVG url() may only point at in-page fragments"
    assert not re.search(r"<(link|iframe|img|object|embed)\b|<script[^>]*\bsrc=|@import", html, flags=re.I)
    # every data call is relative to the page, so it works behind a path prefix too
    for path in re.findall(r"""api\("([^"]+)\"""", html):
        assert path.startswith("v1/"), path


def test_page_never_puts_the_key_in_a_url():
    html = TestClient(make_app()).get("/dashboard").text
    assert "sessionStorage" in html and "localStorage" not in html
    assert '"Authorization"' in html
    # the one place a key may arrive (#key= for automation) is removed from the address at once
    assert re.search(r"history\.replaceState\(null, \"\", location\.pathname \+ location\.search", html)


# --- GET /v1/energy/methods -------------------------------------------------------------------

def test_methods_breakdown_separates_measured_estimated_simulated_and_missing(ledger):
    record_all(ledger, [
        row(0, joules=4.0, gco2e=0.002),
        row(1, joules=6.0, gco2e=0.003),
        row(2, energy_method="cpu-estimate", energy_scope="cpu", joules=5.0, gco2e=0.0025),
        row(3, model="big", device="sim-h100-0", energy_method="simulated", energy_scope="gpu", joules=100.0, gco2e=0.05),
        row(4, status="error", joules=None, dynamic_joules=None, idle_joules=None, energy_method=None,
            energy_scope=None, gco2e=None, carbon_source=None, carbon_region=None),
    ])
    client = TestClient(make_app(ledger))
    data = client.get("/v1/energy/methods", params={"group_by": "model"}, headers=bearer("reader")).json()["data"]
    got = {(d["model"], d["energy_method"]): (d["method_kind"], d["requests"], d["joules"]) for d in data}
    assert got == {
        ("small", "rapl"): ("measured", 2, 10.0),
        ("small", "cpu-estimate"): ("estimated", 1, 5.0),
        ("small", None): ("none", 1, 0.0),
        ("big", "simulated"): ("simulated", 1, 100.0),
    }
    # per model, the breakdown adds up to the summary the tables show
    summary = {s["model"]: s for s in ledger.summary("model")}
    for model in summary:
        parts = [d for d in data if d["model"] == model]
        assert sum(d["requests"] for d in parts) == summary[model]["requests"]
        assert sum(d["joules"] for d in parts) == pytest.approx(summary[model]["joules"], rel=1e-12)
        assert sum(d["gco2e"] for d in parts) == pytest.approx(summary[model]["gco2e"], rel=1e-12)


def test_methods_by_hour_uses_the_summary_hour_keys_and_honours_the_window(ledger):
    record_all(ledger, [row(0), row(1, time_unix_s=T0 + 3600), row(2, time_unix_s=T0 + 7200, energy_method="simulated")])
    client = TestClient(make_app(ledger))
    since = T0 + 3600
    data = client.get("/v1/energy/methods", params={"group_by": "hour", "since": since},
                      headers=bearer("operator")).json()["data"]
    assert {d["hour"] for d in data} == {s["hour"] for s in ledger.summary("hour", since=since)}
    assert len(data) == 2 and {d["energy_method"] for d in data} == {"rapl", "simulated"}


def test_methods_needs_a_reader_and_rejects_bad_input(ledger):
    client = TestClient(make_app(ledger))
    assert client.get("/v1/energy/methods").status_code == 401
    r = client.get("/v1/energy/methods", headers=bearer("client"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.get("/v1/energy/methods", params={"group_by": "colour"}, headers=bearer("reader"))
    # the shared error envelope names query parameters "query.<name>" today; the name is what matters here
    assert r.status_code == 400 and r.json()["error"]["param"].split(".")[-1] == "group_by"
    r = client.get("/v1/energy/methods", params={"since": "yesterday"}, headers=bearer("reader"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"


# --- the page rendered in a real browser against the real report routes -----------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--window-size=1400,2400"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    return subprocess.run(args + [url], capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture
def live_reports(ledger):
    """The dashboard, energy and operator routers on 127.0.0.1 over a real ledger (no Ray: devices fail)."""
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    import uvicorn

    from scheduler.api.routes import operator

    now = time.time()
    record_all(ledger, [
        row(0, time_unix_s=now - 60, model="tiny-chat", joules=2.5),
        row(1, time_unix_s=now - 50, model="tiny-chat", energy_method="cpu-estimate", energy_scope="cpu", joules=7.5),
        row(2, time_unix_s=now - 40, model="gpu-model", device="sim-h100-0", energy_method="simulated", joules=40.0,
            team="blue", baseline_model="big-model", baseline_joules=100.0, baseline_method="largest-model/size-prior"),
    ])
    app = make_app(ledger, extra_routers=[operator.router])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_page_asks_for_a_key_after_a_401(live_reports, tmp_path):
    dom = render(live_reports + "/dashboard", tmp_path / "profile")
    assert 'data-state="auth"' in dom
    assert re.search(r'<section id="auth"(?![^>]*hidden)', dom), "the key form is shown"


def test_page_renders_mixed_methods_visibly_with_a_reader_key(live_reports, tmp_path):
    dom = render(live_reports + f"/dashboard?window=1h#key={KEYS['reader']}", tmp_path / "profile")
    assert 'data-state="ready"' in dom
    tiny = re.search(r'<tr data-group="tiny-chat">(.*?)</tr>', dom, flags=re.S).group(1)
    assert re.search(r'data-field="joules"[^>]*>10</td>', tiny)
    assert "MIXED:" in tiny and 'data-method="rapl"' in tiny and 'data-method="cpu-estimate"' in tiny
    assert "measured · rapl (cpu+dram) 25% of J" in tiny and "estimated · cpu-estimate (cpu) 75% of J" in tiny
    gpu = re.search(r'<tr data-group="gpu-model">(.*?)</tr>', dom, flags=re.S).group(1)
    assert "MIXED" not in gpu and "simulated · simulated" in gpu
    assert "need an operator key" in dom  # /v1/devices is operator-only: said, not hidden
    # energy saved, per team, key and model: only the request with a baseline, labelled an estimate
    team = re.search(r'<table id="savings-team-table">.*?<tr data-group="blue">(.*?)</tr>', dom, flags=re.S).group(1)
    assert re.search(r'data-field="saved_joules"[^>]*>60</td>', team)
    assert re.search(r'data-field="saved_fraction"[^>]*>60 %</td>', team)
    key = re.search(r'<table id="savings-key-table">.*?<tr data-group="client-key">(.*?)</tr>', dom, flags=re.S).group(1)
    assert re.search(r'data-field="requests_with_baseline"[^>]*>1</td>', key)
    assert re.search(r'<span class="big" id="total-saved">60 J</span>', dom)


# --- the Grafana dashboard --------------------------------------------------------------------

GRAFANA = Path(__file__).resolve().parents[3] / "dashboards" / "wattlane-grafana.json"


def grafana_queries() -> list[tuple[str, str]]:
    import json

    dash = json.loads(GRAFANA.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """A panel query with Grafana's macros and variables filled in, as Grafana sends it to Prometheus."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "6h").replace("$model", ".*")
            .replace("$device", ".*").replace("$team", ".*"))


def test_grafana_queries_use_only_series_that_wattlane_exposes():
    from scheduler.energy.metrics import WattlaneMetrics

    m = WattlaneMetrics()
    m.set_device_source(lambda: [{"device_id": "gpu0", "node": "n0", "kind": "gpu", "power_watts": 1.0, "energy_joules": 1.0,
                                  "power_limit_watts": 2.0, "sm_clock_mhz": 3.0}])
    m.observe_request(model="m", status="ok", prompt_tokens=1, completion_tokens=1, ttft_seconds=0.1, tpot_seconds=0.01,
                      joules=1.0, dynamic_joules=0.5, idle_joules=0.5, gco2e=0.001, api_key="k", team="t",
                      baseline_joules=3.0)
    m.set_budget_used(scope="team", name="t", kind="energy", used_ratio=0.5)
    m.set_replica_queue(model="m", replica="r", running=1, waiting=0)
    m.power_action(device="gpu0", action="set_power_limit")
    m.set_grid_intensity(region="USA", gco2e_per_kwh=380.0)
    m.set_quality_budget({"target": 0.95, "served_mean": 0.96, "threshold": 0.89, "window": 100, "shed": 1})
    exposed = {line.split("{")[0].split(" ")[0] for line in m.render()[0].decode().splitlines() if line and not line.startswith("#")}
    queries = grafana_queries()
    assert len(queries) >= 20
    used = {name for _, e in queries for name in re.findall(r"\bwattlane_[a-z0-9_]+", e)}
    assert used - exposed == set(), f"panels query series that /metrics does not expose: {used - exposed}"
    # every family named in DESIGN.md (Metrics) has a panel
    families = {n.removesuffix("_bucket") for n in used}
    for name in ("wattlane_device_power_watts", "wattlane_device_power_limit_watts", "wattlane_energy_joules_total",
                 "wattlane_carbon_grams_total", "wattlane_tokens_total", "wattlane_requests_total",
                 "wattlane_request_ttft_seconds", "wattlane_request_tpot_seconds", "wattlane_power_actions_total",
                 "wattlane_grid_intensity_gco2e_per_kwh"):
        assert name in families, name


def test_grafana_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool (Debian package prometheus) is required in CI")
        pytest.skip("promtool is not installed")
    import yaml

    rules = [{"record": f"wattlane:panel_{i}", "expr": concrete(e)} for i, (_, e) in enumerate(grafana_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana-panels", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
