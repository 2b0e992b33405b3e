"""A node agent's device counters and its attributor's books, read as of the same meter sample (the
conservation tests compare the two: tests/integration/test_energy_counter_conservation.py, tests/e2e/test_multi_node.py)."""

from __future__ import annotations

import time

import ray


def _counters(agent) -> tuple[float, float, set[str]]:
    """(sum of device counters, sum of the meter's totals, device ids), all read in one snapshot."""
    devices = ray.get(agent.gateway_view.remote()).devices
    metered = [d for d in devices if d.get("energy_joules") is not None and d.get("energy_joules_metered") is not None]
    return (sum(d["energy_joules"] for d in metered), sum(d["energy_joules_metered"] for d in metered),
            {d["device_id"] for d in metered})


def counters_and_books(agent, tries: int = 60) -> tuple[float, dict[str, float], set[str]]:
    """The device counters and the attributor's balance, read as of the same meter sample.

    The attributor's books end at the meter's last 100 ms sample, so the counter is read when it is
    closest to that sample (the gap is then a few ms of power instead of up to 100 ms), and the balance
    is kept only if no sample fell between the two counter reads around it. Only the choice of the
    moment uses the meter; the energy figure is the device counter's own.
    """
    best: tuple[float, float, dict[str, float], set[str]] | None = None
    for _ in range(tries):
        counter, meter_total, ids = _counters(agent)
        balance = ray.get(agent.energy_balance.remote())
        counter2, meter_total2, _ = _counters(agent)
        if meter_total2 == meter_total:  # no meter sample in between: the balance is as of the same sample
            gap = counter - meter_total  # counter since the sample, plus a constant (the counter at the meter's start)
            if best is None or gap < best[0]:
                best = (gap, counter, balance, ids)
        time.sleep(0.013)  # not a divisor of the meter period, so the reads walk across it
    assert best is not None and best[3], "no device reports an energy counter (or the meter never held still)"
    return best[1], best[2], best[3]
