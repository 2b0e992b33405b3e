"""Time stamps at each hop of one non-streaming chat, Wattlane's path and the plain Ray Serve app's.

    git worktree add /tmp/hops 2369bb3 && cd /tmp/hops   # the patch applies to the code it was made on
    git apply benchmarks/hop_stamps/hop_stamps.patch      # adds scheduler/_hops.py and the stamps
    python benchmarks/hop_stamps/run.py /tmp/hops-after 300
    python benchmarks/hop_stamps/compare.py /tmp/hops-before /tmp/hops-after   # the tables
    git apply -R benchmarks/hop_stamps/hop_stamps.patch

Every process (Serve proxy, gateway, replicas, node agent, engine thread) appends
(time.monotonic_ns(), hop name) to a file of its own under the directory given; CLOCK_MONOTONIC is
one clock for every process on the machine. The requests are sequential, so the stamps between a
request's send and its answer are that request's. Same setup as benchmarks/gateway_overhead.py
(one Ray session, one proxy, the two apps alternated), N requests each after 30 warm-up pairs.
"""
import os, sys, time, glob, collections, statistics, tempfile
from pathlib import Path
hops_dir = sys.argv[1]; N = int(sys.argv[2])
os.makedirs(hops_dir, exist_ok=True)
for f in glob.glob(hops_dir + "/*.txt"): os.unlink(f)
os.environ["WATTLANE_HOPS"] = hops_dir
import httpx
from ray import serve
from benchmarks.gateway_overhead import _plain_app, MODEL_ID, PROMPT
from scheduler.cluster.lifecycle import Deployment
from scheduler.config import load_config
from tests.support.server import free_port
from scheduler._hops import hop, flush
state_dir = Path(tempfile.mkdtemp(prefix="wattlane-hops-"))
os.environ["WATTLANE_STATE_DIR"] = str(state_dir)
cfg = load_config(None); port = free_port(); cfg.server.host, cfg.server.port = "127.0.0.1", port
dep = Deployment(cfg, state_dir)
windows = []
try:
    dep.start(host="127.0.0.1", port=port)
    serve.run(_plain_app(cfg.model_dump(mode="json"), str(state_dir)), name="plain", route_prefix="/plain", blocking=False)
    body = {"model": MODEL_ID, "messages": PROMPT, "max_tokens": 1}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        while c.post("/plain/v1/chat/completions", json=body).status_code != 200: time.sleep(0.5)
        pair = (("plain", "/plain/v1/chat/completions"), ("wattlane", "/v1/chat/completions"))
        for i in range(30 + N):
            for name, path in (pair if i % 2 == 0 else pair[::-1]):
                t0 = time.monotonic_ns(); r = c.post(path, json=body); t1 = time.monotonic_ns()
                assert r.status_code == 200, r.text
                if i >= 30: windows.append((name, t0, t1))
        # enough extra traffic to flush buffers
        for i in range(40): c.post("/v1/chat/completions", json=body); c.post("/plain/v1/chat/completions", json=body)
    time.sleep(1)
finally:
    la = os.getloadavg()
    dep.stop()
stamps = []
for f in glob.glob(hops_dir + "/*.txt"):
    pid = os.path.basename(f)[:-4]
    for line in open(f):
        t, n = line.split(); stamps.append((int(t), n, pid))
stamps.sort()
import bisect
ts = [s[0] for s in stamps]
per = {"plain": collections.defaultdict(list), "wattlane": collections.defaultdict(list)}
seqs = {"plain": collections.Counter(), "wattlane": collections.Counter()}
for name, t0, t1 in windows:
    a, b = bisect.bisect_left(ts, t0), bisect.bisect_right(ts, t1)
    seq = [("c.send", t0, "c")] + [(n, t, p) for t, n, p in stamps[a:b]] + [("c.recv", t1, "c")]
    # label mw stamps by process order: first mw.in is the proxy, second the gateway
    seen = collections.Counter(); out = []
    for n, t, p in seq:
        seen[n] += 1
        out.append((n if seen[n] == 1 else f"{n}#{seen[n]}", t))
    seqs[name][tuple(n for n, _ in out)] += 1
    for (n0, a0), (n1, a1) in zip(out, out[1:]):
        per[name][f"{n0} -> {n1}"].append((a1 - a0) / 1e6)
    per[name]["TOTAL"].append((t1 - t0) / 1e6)
for name in per:
    print(f"== {name}: {len(windows)//2} requests; most common sequence x{seqs[name].most_common(1)[0][1]}")
    common = seqs[name].most_common(1)[0][0]
    for (n0, n1) in zip(common, common[1:]):
        k = f"{n0} -> {n1}"; v = per[name][k]
        print(f"  {k:40s} median {statistics.median(v):7.3f} ms  p90 {sorted(v)[int(len(v)*0.9)]:7.3f}  n={len(v)}")
    v = per[name]["TOTAL"]; print(f"  {'TOTAL':40s} median {statistics.median(v):7.3f} ms")
print("load", la)
import json; json.dump(windows, open(hops_dir + "/windows.json", "w"))
