"""The `wattlane power` CLI against a PowerService behind an in-process HTTP handler; the service's lifecycle."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from typer.testing import CliRunner

from power_test_devices import MemoryGpu
from scheduler.cli import app, _register_all
from scheduler.config import WattlaneConfig
from scheduler.devices.base import DeviceError
from scheduler.power import commands
from scheduler.power.policies import PolicyError
from scheduler.power.service import PowerService

_register_all()
runner = CliRunner()
KEY = "sk-operator"


def make_service(tmp_path, mode="enforce"):
    cfg = WattlaneConfig.model_validate({
        "models": [{"id": "m", "kind": "chat", "engine": "simulated", "devices": []}],
        "power": {"mode": mode, "groups": [{"name": "rack", "devices": ["gpu0", "gpu1"], "policy": "none"}]},
    })
    gpus = {d: MemoryGpu(d) for d in ("gpu0", "gpu1")}
    return PowerService(cfg, gpus, tmp_path, "node0", start_loop=False), gpus


def handler_for(svc):
    """Just enough of the gateway's operator routes, with its auth and error envelope."""

    def env(status, msg):
        return httpx.Response(status, json={"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}})

    def handle(req: httpx.Request) -> httpx.Response:
        if req.headers.get("authorization") != f"Bearer {KEY}":
            return env(401, "missing or invalid API key")
        body = json.loads(req.content) if req.content else None
        path, m = req.url.path, req.method
        try:
            if path == "/v1/devices" and m == "GET":
                return httpx.Response(200, json={"object": "list", "data": [
                    {**g.snapshot().__dict__, "running_requests": 0} for g in svc.devices.values()]})
            if mt := re.fullmatch(r"/v1/devices/(\w+)/power-limit", path):
                if m == "PUT":
                    return httpx.Response(200, json=svc.set_power_limit(mt[1], body["watts"], actor="api-key:op"))
                return httpx.Response(200, json=svc.reset_power_limit(mt[1], actor="api-key:op"))
            if mt := re.fullmatch(r"/v1/devices/(\w+)/locked-clocks", path):
                if m == "PUT":
                    return httpx.Response(200, json=svc.set_locked_clocks(mt[1], body["min_mhz"], body["max_mhz"], actor="api-key:op"))
                return httpx.Response(200, json=svc.reset_locked_clocks(mt[1], actor="api-key:op"))
            if path == "/v1/power/policy":
                return httpx.Response(200, json=svc.get_policy() if m == "GET" else svc.put_policy(body, actor="api-key:op"))
            if path == "/v1/power/audit":
                return httpx.Response(200, json={"object": "list", "data": svc.audit(device=req.url.params.get("device"))})
        except (DeviceError, PolicyError) as exc:
            return env(400, str(exc))
        return env(404, "not found")

    return handle


@pytest.fixture
def served(tmp_path, monkeypatch):
    svc, gpus = make_service(tmp_path)
    transport = httpx.MockTransport(handler_for(svc))
    monkeypatch.setattr(commands, "make_client", lambda url, key: httpx.Client(
        base_url=url, transport=transport, headers={"Authorization": f"Bearer {key}"} if key else {}))
    monkeypatch.setenv("WATTLANE_API_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "200")
    yield svc, gpus
    svc.close()


def cli(*args):
    return runner.invoke(app, ["power", *args])


def test_cli_set_show_reset_and_audit(served):
    svc, gpus = served
    r = cli("set", "gpu0", "--watts", "350", "--clocks", "900:1400", "--reason", "night shift")
    assert r.exit_code == 0, r.output
    assert gpus["gpu0"].limit_watts == 350 and gpus["gpu0"].lock == (900, 1400)
    assert "700 W -> 350 W: applied" in r.output
    r = cli("show")
    assert r.exit_code == 0 and "gpu0" in r.output and "350 W" in r.output and "900-1400 MHz" in r.output
    r = cli("reset", "gpu0")
    assert r.exit_code == 0, r.output
    assert gpus["gpu0"].limit_watts == 700 and gpus["gpu0"].lock is None
    r = cli("audit", "--device", "gpu0", "--json")
    rows = json.loads(r.output)
    assert [x["action"] for x in rows] == ["reset_locked_clocks", "reset_power_limit", "set_locked_clocks", "set_power_limit"]
    assert all(x["actor"] == "api-key:op" for x in rows)


def test_cli_refusal_is_a_clear_error_without_traceback(served):
    _, gpus = served
    r = cli("set", "gpu0", "--watts", "5000")
    assert r.exit_code == 1
    assert "HTTP 400" in r.output and "outside the device's range [200, 700] W" in r.output
    assert "Traceback" not in r.output and gpus["gpu0"].limit_watts == 700


def test_cli_policy_set_and_validation(served):
    svc, gpus = served
    r = cli("policy", "rack", "budget", "-o", "budget_watts=900")
    assert r.exit_code == 0, r.output
    assert svc.get_policy()["groups"][0]["policy"] == "budget"
    svc.step(0.0)
    assert gpus["gpu0"].limit_watts + gpus["gpu1"].limit_watts <= 900
    r = cli("policy", "rack", "budget", "-o", "budget_watts=100")
    assert r.exit_code == 1 and "below the sum of the group's minimum power limits (400 W)" in r.output
    r = cli("policy", "rack", "nonsense")
    assert r.exit_code == 1 and "unknown policy 'nonsense'" in r.output
    r = cli("policy", "--json")
    assert json.loads(r.output)["groups"][0]["options"] == {"budget_watts": 900}


def test_cli_without_key_and_unreachable_server(served, monkeypatch):
    monkeypatch.delenv("WATTLANE_API_KEY")
    r = cli("show")
    assert r.exit_code == 1 and "HTTP 401" in r.output and "--api-key" in r.output
    monkeypatch.setattr(commands, "make_client", lambda url, key: httpx.Client(base_url=url))
    r = runner.invoke(app, ["power", "show", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "cannot connect" in r.output and "Traceback" not in r.output


def test_service_stop_restores_every_device(tmp_path):
    svc, gpus = make_service(tmp_path)
    svc.set_power_limit("gpu0", 300)
    svc.set_locked_clocks("gpu1", 500, 500)
    svc.report_replica_stats("r1", {"device_ids": ["gpu1"], "running": 3})
    assert svc.stats_by_device()["gpu1"][0]["running"] == 3
    result = svc.stop()
    assert gpus["gpu0"].limit_watts == 700 and gpus["gpu1"].lock is None
    assert result["failed"] == [] and result["pending"] == []
    assert svc.stop()["restored"] == []  # idempotent


@pytest.fixture
def recorded(monkeypatch):
    """The requests the CLI sends, each answered as an applied change."""
    seen: list[httpx.Request] = []

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"outcome": "applied", "old_value": 700.0, "new_value": 100.0})

    transport = httpx.MockTransport(handle)
    monkeypatch.setattr(commands, "make_client", lambda url, key: httpx.Client(base_url=url, transport=transport))
    monkeypatch.setenv("COLUMNS", "200")
    return seen


@pytest.mark.parametrize("device, segment", [
    ("gpu0/../../v1/keys", "gpu0%2F..%2F..%2Fv1%2Fkeys"),  # was PUT /v1/v1/keys/power-limit
    ("gpu 0?x=1#", "gpu%200%3Fx%3D1%23"),                  # was PUT /v1/devices/gpu%200, the rest a query
    ("..", "%2E%2E"),                                       # a dot segment the URL would resolve away
    ("[/x]", "%5B%2Fx%5D"),                                 # and printed back as it is, not as markup
])
def test_cli_sends_a_device_id_as_one_path_segment(recorded, device, segment):
    r = cli("set", device, "--watts", "100", "--clocks", "900")
    assert r.exit_code == 0, r.output
    assert f"{device}: power limit 700 W -> 100 W: applied" in r.output
    r = cli("reset", device)
    assert r.exit_code == 0, r.output
    assert [(q.method, q.url.raw_path.decode()) for q in recorded] == [
        ("PUT", f"/v1/devices/{segment}/power-limit"), ("PUT", f"/v1/devices/{segment}/locked-clocks"),
        ("DELETE", f"/v1/devices/{segment}/power-limit"), ("DELETE", f"/v1/devices/{segment}/locked-clocks"),
    ]


@pytest.mark.parametrize("args, option", [
    (["--watts", "nan"], "--watts"), (["--watts", "inf"], "--watts"), (["--clocks", "nan"], "--clocks"),
    (["--clocks", "900:inf"], "--clocks"), (["--watts", "300", "--clocks", "nan"], "--clocks"),
])
def test_cli_refuses_a_value_that_is_not_finite_before_any_request(recorded, args, option):
    r = cli("set", "gpu0", *args)
    assert r.exit_code == 2 and f"error: {option} takes" in r.output and r.output.count("\n") == 1, r.output
    assert not recorded  # not even the power limit of `--watts 300 --clocks nan`


@pytest.mark.parametrize("option, value, message", [
    ("--api-key", "é", "--api-key (or WATTLANE_API_KEY) holds 'é'"),  # was UnicodeEncodeError from httpx's headers
    ("--url", "http://[::1", "--url 'http://[::1' is not a gateway URL"),  # was httpx.InvalidURL
])
def test_cli_refuses_a_key_or_url_httpx_cannot_use(option, value, message):
    r = cli("show", option, value)  # the real make_client: httpx raised these, as tracebacks
    assert r.exit_code == 2 and f"error: {message}" in r.output, (r.exception, r.output)
