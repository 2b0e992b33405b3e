"""Per-hop medians (ms) of runs of run.py, one column per run: Wattlane's hops, then the plain app's."""
import sys, glob, json, bisect, collections, statistics
def load(d):
    windows = json.load(open(d + "/windows.json"))
    stamps = []
    for f in glob.glob(d + "/*.txt"):
        for line in open(f):
            t, n = line.split(); stamps.append((int(t), n))
    stamps.sort(); ts = [s[0] for s in stamps]
    per = {"plain": [], "wattlane": []}
    for name, t0, t1 in windows:
        a, b = bisect.bisect_left(ts, t0), bisect.bisect_right(ts, t1)
        seen = collections.Counter(); o = {"c.send": t0, "c.recv": t1}
        for t, n in stamps[a:b]:
            seen[n] += 1
            k = n if seen[n] == 1 else f"{n}#{seen[n]}"
            o.setdefault(k, t)
        per[name].append(o)
    return per
W = [("client -> proxy", "c.send", "mw.in"), ("proxy -> gateway ASGI", "mw.in", "mw.in#2"),
     ("gateway: body read (receive from proxy)", "mw.in#2", "g.body_read"),
     ("gateway: FastAPI validation, auth, Job", "g.body_read", "g.route_in"),
     ("gateway: admission + route", "g.route_in", "g.remote"), ("gateway: handle.remote()", "g.remote", "g.remote_ret"),
     ("Serve dispatch -> replica", "g.remote_ret", "r.gen_in"),
     ("replica: start, reports, tokenize, engine thread start", "r.gen_in", "e.run_in"),
     ("engine: prefill + 1 token", "e.run_in", "e.emit#3"),
     ("replica: engine events -> finish call", "e.emit#3", "r.fin_call"),
     ("agent round trip (finish -> energy)", "r.fin_call", "r.fin_ret"),
     ("end event replica -> gateway", "r.fin_ret", "g.end_ev"),
     ("gateway: accounting (carbon, baseline, ledger commit, metrics)", "g.end_ev", "g.acct_out"),
       ("  of which ledger commit", "g.row", "g.commit"),
     ("gateway: result -> JSONResponse", "g.acct_out", "g.json_built"),
     ("gateway response -> proxy -> client", "g.json_built", "c.recv"), ("TOTAL", "c.send", "c.recv")]
P = [("client -> proxy", "c.send", "mw.in"), ("proxy -> ingress handler", "mw.in", "p.route_in"),
     ("handler: body read + handle dispatch -> model", "p.route_in", "p.model_in"),
     ("model: tokenize, engine thread start", "p.model_in", "e.run_in"), ("engine: prefill + 1 token", "e.run_in", "e.emit#3"),
     ("model return -> ingress", "e.emit#3", "p.got"), ("ingress: FastAPI response -> proxy -> client", "p.got", "c.recv"),
     ("TOTAL", "c.send", "c.recv")]
def med(rows, a, b):
    v = [(o[b] - o[a]) / 1e6 for o in rows if a in o and b in o]
    return statistics.median(v) if v else float("nan")
runs = [(d, load(d)) for d in sys.argv[1:]]
print("| Wattlane hop | " + " | ".join(d.split("/")[-1] for d, _ in runs) + " |")
print("|---|" + "---:|" * len(runs))
for label, a, b in W:
    print(f"| {label} | " + " | ".join(f"{med(p['wattlane'], a, b):.2f}" for _, p in runs) + " |")
print()
print("| plain hop | " + " | ".join(d.split("/")[-1] for d, _ in runs) + " |")
print("|---|" + "---:|" * len(runs))
for label, a, b in P:
    print(f"| {label} | " + " | ".join(f"{med(p['plain'], a, b):.2f}" for _, p in runs) + " |")
