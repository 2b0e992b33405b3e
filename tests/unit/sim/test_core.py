"""The shared batching core: continuous batching, timing, KV-cache preemption, mid-run admission."""

from scheduler.devices.simulated import SimulatedGpu
from scheduler.sim.core import BatchCore, CoreListener, SimRequest
from scheduler.sim.profiles import model_profile


class Rec(CoreListener):
    def __init__(self):
        self.done = []

    def on_finish(self, req, now):
        self.done.append(req)


def _core(**kw):
    t = [0.0]
    g = SimulatedGpu("g0", "h100-sxm", clock=lambda: t[0])
    rec = Rec()
    core = BatchCore(model_profile("llama-3.1-8b@h100-sxm"), [g], listener=rec, **kw)
    return core, rec, t, g


def _drain(core, t, wake, arrivals=()):
    pending = sorted(arrivals, key=lambda r: r.arrival_s)
    while wake is not None or pending:
        if pending and (wake is None or pending[0].arrival_s <= wake):
            r = pending.pop(0)
            t[0] = r.arrival_s
            wake = core.submit(r, r.arrival_s)
            continue
        t[0] = wake
        wake = core.advance(wake)


def test_single_request_ttft_and_tpot():
    core, rec, t, g = _core()
    req = SimRequest("a", 1000, 100, 0.0)
    _drain(core, t, core.submit(req, 0.0))
    assert rec.done == [req]
    assert 0.005 < req.ttft_seconds < 0.2
    assert 0.005 < req.tpot_seconds < 0.012  # Llama-3.1-8B at batch 1 on an H100: ~7 ms
    assert core.tokens_generated == 100
    assert g.energy_joules_at(t[0]) > 0 and not g.busy


def test_batching_amortises_energy_and_arrival_cuts_a_run():
    core, rec, t, g = _core()
    first = SimRequest("a", 100, 500, 0.0)
    late = SimRequest("b", 100, 10, 0.5)
    _drain(core, t, core.submit(first, 0.0), [late])
    # the late request joined the running batch within one iteration, not after the run
    assert late.ttft_seconds < 0.05
    assert first.finish_s > late.finish_s


def test_kv_cache_full_preempts_and_still_finishes_all():
    core, rec, t, g = _core(kv_capacity_tokens=3000)
    reqs = [SimRequest(f"r{i}", 500, 800, 0.0) for i in range(4)]
    wake = None
    for r in reqs:
        wake = core.submit(r, 0.0)
    _drain(core, t, wake)
    assert core.preemptions > 0
    assert len(rec.done) == 4 and all(r.finish_s is not None for r in reqs)
    assert core.kv_used_tokens == 0


def test_power_cap_change_mid_run_replans():
    core, rec, t, g = _core()
    req = SimRequest("a", 20000, 2000, 0.0)
    wake = core.submit(req, 0.0)
    t[0] = 0.01
    g.set_power_limit_watts(200)
    wake2 = core.replan_after_settings_change(0.01)
    assert wake2 <= wake
    _drain(core, t, wake2)
    assert req.finish_s is not None
