"""Three Ray nodes on this machine (three raylets, each Wattlane node a, b or c with its own simulated GPU)
serving one model through the gateway, deployed with `serve deploy` of what `wattlane deploy-config` wrote:
requests spread over the nodes, each response names its node and device, each node's energy adds up to its
own meters and the ledger holds each response's joules; deploying again keeps one agent per node; a killed node agent
comes back without double counting; a node that dies is dropped and none of its requests is lost silently,
and when it comes back it gets its agent, its device with restored settings, and traffic."""

from __future__ import annotations

import collections
import concurrent.futures
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.ray_cluster import LocalRayCluster
from tests.support.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # Ray clusters start slowly on 2 busy cores

REPO = Path(__file__).resolve().parents[2]
NODES = ["a", "b", "c"]
GPU_OF = {n: f"sim-{n}0" for n in NODES}
MODEL = "llama-3.1-8b"


def cluster_config(state_dir: Path, port: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    small = next(m for m in cfg["models"] if m["id"] == MODEL)
    small.update(devices=[GPU_OF[n] for n in NODES], replicas=len(NODES), max_ongoing_requests=2)
    # two requests at a time per replica: six at once cannot all stay on the (energy-wise best) one
    cfg["models"] = [small]
    cfg["devices"]["simulated"] = [{"id": GPU_OF[n], "profile": "h100-sxm", "node": n} for n in NODES]
    cfg["server"].update(port=port, host="127.0.0.1", state_dir=str(state_dir))
    cfg["power"]["mode"] = "enforce"  # simulated GPUs take settings: the restore on return is real
    cfg["routing"]["admission"] = "queue"
    return cfg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    port = free_port()
    state = tmp / "state"
    (tmp / "wattlane.yaml").write_text(yaml.safe_dump(cluster_config(state, port)))
    gen = subprocess.run([sys.executable, "-m", "scheduler", "deploy-config", "--config", str(tmp / "wattlane.yaml"),
                          "--state-dir", str(state), "--out", str(tmp / "serve.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    c = LocalRayCluster(tmp, fast_node_death=True)
    try:
        c.start_head(num_cpus=2, resources={"wattlane_node_a": 1})
        c.add_node("b", num_cpus=1)
        c.add_node("c", num_cpus=1)
        c.serve("deploy", str(tmp / "serve.yaml"))
        c.wait_app_running()
        c.url = f"http://127.0.0.1:{port}"
        c.serve_file = tmp / "serve.yaml"
        yield c
    finally:
        c.stop()


def chat(url: str, max_tokens: int = 24, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Tell me about GPUs."}],
                            "max_tokens": max_tokens})


BOOKS = """
from tests.support.energy_books import counters_and_books

result = {}
for name in %r:
    agent = runtime.get_node_agent(name)
    # the counter read closest to the meter's last sample, where the books end (a read up to a meter period
    # later is about 1%% of a short run's energy at idle power)
    counter, balance, _ = counters_and_books(agent)
    result[name] = {"counter": counter, "balance": balance, "ready": ray.get(agent.ready.remote())}
"""


def node_books(cluster, nodes) -> dict:
    return cluster.driver(BOOKS % (list(nodes),))


def assert_node_energy_adds_up(books: dict, responses: list[dict], node: str, since_s: float = 0.0) -> None:
    """What the node's responses were charged, plus its idle pool, unsettled and start-up joules (the idle
    metered before the service was ready, charged to no request), is its device counter."""
    b = books[node]
    assert b is not None, f"no consistent read of node {node}'s books"
    charged = sum(r["usage"]["energy"]["joules"] for r in responses
                  if r["routing"]["node"] == node and r["created"] >= since_s)
    bal = b["balance"]
    accounted = charged + bal["idle_pool_joules"] + bal["unsettled_joules"] + bal.get("startup_joules", 0.0)
    assert accounted == pytest.approx(b["counter"], rel=0.01), (node, charged, bal, b["counter"])


def test_requests_spread_over_three_nodes_and_each_node_adds_up(cluster):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: chat(cluster.url), range(18)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    bodies = [r.json() for r in rs]
    used = {b["routing"]["node"] for b in bodies}
    assert used == set(NODES), f"requests did not spread over every node: {[b['routing'] for b in bodies]}"
    for b in bodies:  # the device a response names is the one on the node it names
        node = b["routing"]["node"]
        assert b["routing"]["device"] == b["usage"]["energy"]["device"] == GPU_OF[node], b["routing"]
        assert b["usage"]["energy"]["method"] == "simulated"
    devices = httpx.get(cluster.url + "/v1/devices", timeout=30).json()["data"]
    assert {d["device_id"]: d["agent_node"] for d in devices} == {GPU_OF[n]: n for n in NODES}
    time.sleep(1.0)  # let the last intervals settle
    books = node_books(cluster, NODES)
    assert len({books[n]["ready"]["pid"] for n in NODES}) == 3  # three agents, one per node
    for node in NODES:
        assert_node_energy_adds_up(books, bodies, node)
    # the gateway wrote each request's ledger row, with the joules its response said
    rows = {r["request_id"]: r for r in httpx.get(cluster.url + "/v1/energy/requests", params={"limit": 100},
                                                  timeout=30).json()["data"]}
    assert set(rows) == {b["id"] for b in bodies}
    assert all(rows[b["id"]]["joules"] == pytest.approx(b["usage"]["energy"]["joules"]) for b in bodies)


def test_a_second_serve_deploy_keeps_one_agent_per_node(cluster):
    """A config change, or the same file again: the application builder finds each node's agent."""
    before = node_books(cluster, NODES)
    cluster.serve("deploy", str(cluster.serve_file))
    cluster.wait_app_running()
    r = chat(cluster.url)
    assert r.status_code == 200 and r.json()["usage"]["energy"]["joules"] > 0, r.text
    devices = httpx.get(cluster.url + "/v1/devices", timeout=30).json()["data"]
    assert sorted(d["device_id"] for d in devices) == sorted(GPU_OF.values())
    after = node_books(cluster, NODES)
    assert {n: after[n]["ready"]["pid"] for n in NODES} == {n: before[n]["ready"]["pid"] for n in NODES}


def test_killed_node_agent_is_restarted_and_meters_from_zero_again(cluster):
    before = node_books(cluster, ["b"])["b"]["ready"]
    import psutil

    psutil.Process(before["pid"]).kill()
    deadline = time.time() + 120
    while True:  # Ray restarts it on its node (max_restarts); its replica's engine reopens there
        try:
            after = node_books(cluster, ["b"])["b"]["ready"]
            if after["pid"] != before["pid"]:
                break
        except AssertionError:
            pass
        assert time.time() < deadline, "node agent of b was not restarted"
        time.sleep(2)
    restarted_s = after["started_s"]
    bodies = []
    deadline = time.time() + 90
    while sum(1 for b in bodies if b["routing"]["node"] == "b") < 3:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six at once: every replica gets work
            rs = list(pool.map(lambda _: chat(cluster.url), range(6)))
        for r in rs:
            assert r.status_code in (200, 503), r.text  # a request caught by the restart ends in the envelope
            if r.status_code == 200:
                bodies.append(r.json())
            else:
                assert r.json()["error"]["message"]
        assert time.time() < deadline, "no request reached node b after its agent restarted"
    # the counter also holds the joules between the GPU's creation and the meter's first sample (a few
    # joules while the restarted agent starts up): a longer window keeps that fixed amount well under 1%
    time.sleep(8.0)
    books = node_books(cluster, ["b"])
    # the restarted agent's books start at its start: what it charged since, plus its pool, is its counter
    # (anything charged twice, or carried over from before the kill, would break the equality)
    assert_node_energy_adds_up(books, bodies, "b", since_s=restarted_s)


def test_a_node_that_dies_is_dropped_nothing_is_lost_and_it_comes_back(cluster):
    url = cluster.url
    # a setting on c's GPU that its agent must put back when the node returns
    r = httpx.put(url + f"/v1/devices/{GPU_OF['c']}/power-limit", json={"watts": 350, "reason": "test"}, timeout=30)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text

    outcomes: list[tuple[float, httpx.Response | Exception]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            t = time.time()
            try:
                outcomes.append((t, chat(url, max_tokens=64, timeout=90)))
            except Exception as exc:  # a request with no answer at all would be lost silently
                outcomes.append((t, exc))

    threads = [threading.Thread(target=load) for _ in range(6)]  # every replica busy: c has work in flight
    for t in threads:
        t.start()
    time.sleep(4)
    killed_s = time.time()
    cluster.kill_node("c")
    time.sleep(30)
    stop.set()
    for t in threads:
        t.join(120)

    lost = [o for _, o in outcomes if isinstance(o, Exception)]
    assert not lost, lost
    ok = [(t, r.json()) for t, r in outcomes if r.status_code == 200]
    failed = [(t, r) for t, r in outcomes if r.status_code != 200]
    for _, r in failed:  # an in-flight request on the dead node ends in the OpenAI error envelope
        assert r.status_code in (502, 503, 504), r.text
        assert r.json()["error"]["message"], r.text
    # dropped from routing within seconds: nothing starting 15 s after the kill goes to c or fails
    late = [(t, r) for t, r in outcomes if t > killed_s + 15]
    assert late and all(r.status_code == 200 and r.json()["routing"]["node"] != "c" for _, r in late), \
        [(round(t - killed_s, 1), r.status_code, r.text[:200]) for t, r in late if r.status_code != 200
         or r.json()["routing"]["node"] == "c"]
    assert any(b["routing"]["node"] == "c" for t, b in ok if t < killed_s), "c took no traffic before"
    touched_c = [t - killed_s for t, r in outcomes
                 if t >= killed_s and (r.status_code != 200 or r.json()["routing"]["node"] == "c")]
    kinds = collections.Counter((r.status_code, r.json()["error"]["code"], r.json()["error"]["message"][:90])
                                for _, r in failed)
    print(f"node loss: {len(outcomes)} requests, {len(failed)} in the error envelope; the last one that started "
          f"after the kill and failed or went to c started {max(touched_c, default=0):.1f} s after it; errors: "
          f"{kinds.most_common(6)}")
    # every request that reached a replica has its ledger row, failed or not (a no_capacity 503 says no
    # replica could take it: the gateway tried its model's other replicas first)
    ids = {r.headers["x-request-id"] for _, r in outcomes
           if r.status_code == 200 or r.json()["error"]["code"] != "no_capacity"}
    assert all("," not in i for i in ids), ids  # one id per response
    rows = httpx.get(url + "/v1/energy/requests", params={"limit": 1000}, timeout=30).json()["data"]
    assert ids <= {row["request_id"] for row in rows}
    deadline = time.time() + 30
    while any(d["agent_node"] == "c" for d in httpx.get(url + "/v1/devices", timeout=30).json()["data"]):
        assert time.time() < deadline, "the dead node's device is still listed"
        time.sleep(1)

    # the node comes back: the gateway starts its agent, which restores c's GPU, and c takes traffic again
    cluster.add_node("c", num_cpus=1)
    deadline = time.time() + 180
    while True:
        devices = {d["device_id"]: d for d in httpx.get(url + "/v1/devices", timeout=30).json()["data"]}
        if GPU_OF["c"] in devices:
            break
        assert time.time() < deadline, "node c's device did not come back"
        time.sleep(2)
    assert devices[GPU_OF["c"]]["power_limit_watts"] == devices[GPU_OF["c"]]["default_power_limit_watts"]
    audit = httpx.get(url + "/v1/power/audit", params={"device": GPU_OF["c"], "node": "c"},
                      timeout=30).json()["data"]
    assert any(a["action"] == "restore" for a in audit), audit
    # energy placement packs work onto replicas already busy (an idle GPU's wake-up costs more), so a replica
    # takes traffic only once the busy ones are full (max_ongoing_requests 2 each): long requests, more of
    # them than a and b hold together, as in the load before the kill
    back_s = time.time()
    deadline = back_s + 240
    while True:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: chat(url, max_tokens=64), range(8)))
        if any(r.status_code == 200 and r.json()["routing"]["node"] == "c" for r in rs):
            break
        if time.time() > deadline:
            went = sorted((r.status_code, r.json()["routing"]["device"] if r.status_code == 200 else
                           r.json()["error"]["code"]) for r in rs)
            status = cluster.serve("status", timeout=60)
            pytest.fail(f"node c took no traffic in 240 s after its device came back; the last round went to "
                        f"{went}; serve status:\n{status.stdout}{status.stderr}")
        time.sleep(3)
    print(f"node c took traffic {time.time() - back_s:.0f} s after its device came back")
