"""The actuator's safety rules: refusal without clamping, durable originals, restore, recommend-only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from power_test_devices import FileGpu, MemoryGpu
from scheduler.devices.base import DeviceNotSupportedError, DevicePermissionError, DeviceSettingError
from scheduler.power.actuator import PowerActuator
from scheduler.power.audit import PowerAuditLog

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def make(tmp_path, *devs, mode="enforce"):
    audit = PowerAuditLog.in_state_dir(tmp_path)
    devices = {d.device_id: d for d in devs}
    return PowerActuator(devices, tmp_path, mode=mode, audit=audit), audit


@pytest.mark.parametrize("watts", [199.0, 701.0, -5.0, float("nan")])
def test_out_of_range_power_limit_is_refused_and_nothing_changes(tmp_path, watts):
    gpu = MemoryGpu()
    act, audit = make(tmp_path, gpu)
    with pytest.raises(DeviceSettingError) as err:
        act.set_power_limit("gpu0", watts, actor="operator:alice", reason="test")
    assert "200" in str(err.value) and "700" in str(err.value) or "not a number" in str(err.value)
    assert gpu.limit_watts == 700.0
    assert [c for c in gpu.calls if c[0] == "set_power_limit" and c[1] != 700.0] == []
    assert not act.saved_path.exists()  # nothing changed, so nothing to restore
    row = audit.query(limit=1)[0]
    assert row["outcome"] == "refused" and row["actor"] == "operator:alice" and row["error"]


def test_out_of_range_clocks_refused(tmp_path):
    gpu = MemoryGpu()
    act, _ = make(tmp_path, gpu)
    for lo, hi in [(100, 1000), (500, 2500), (1500, 1000)]:
        with pytest.raises(DeviceSettingError):
            act.set_locked_clocks("gpu0", lo, hi)
    assert gpu.lock is None


def test_unknown_device_and_unsupported_control(tmp_path):
    cpu = MemoryGpu("cpu0", power_limit=False, clocks=False)
    act, _ = make(tmp_path, cpu)
    with pytest.raises(DeviceSettingError, match="unknown device 'gpu9'"):
        act.set_power_limit("gpu9", 300)
    with pytest.raises(DeviceNotSupportedError):
        act.set_power_limit("cpu0", 300)


def test_originals_saved_before_first_change_and_restored(tmp_path):
    gpu = MemoryGpu()
    gpu.limit_watts = 650.0  # an operator's own setting before Wattlane started
    act, audit = make(tmp_path, gpu)
    act.set_power_limit("gpu0", 400, actor="policy:budget/g", reason="budget")
    saved = json.loads(act.saved_path.read_text())["devices"]["node0/gpu0"]
    assert saved["power_limit_watts"] == 650.0 and saved["locked_clocks_mhz"] is None
    act.set_power_limit("gpu0", 300)
    act.set_locked_clocks("gpu0", 900, 1200)
    # a second change must not overwrite the true original
    assert json.loads(act.saved_path.read_text())["devices"]["node0/gpu0"]["power_limit_watts"] == 650.0
    assert gpu.limit_watts == 300 and gpu.lock == (900, 1200)
    actions = act.restore_all()
    assert gpu.limit_watts == 650.0 and gpu.lock is None
    assert not act.saved_path.exists()
    assert {a.setting for a in actions} == {"power_limit_watts", "locked_clocks_mhz"}
    rows = audit.query()
    assert rows[0]["action"] == "restore" and rows[-1]["old_value"] == 650.0 and rows[-1]["new_value"] == 400.0


def test_leftover_file_is_restored_on_start(tmp_path):
    gpu = MemoryGpu()
    act, _ = make(tmp_path, gpu)
    act.set_power_limit("gpu0", 300)
    # simulate a crash: the actuator object vanishes without restore_all
    del act
    assert gpu.limit_watts == 300
    act2, _ = make(tmp_path, gpu)
    assert gpu.limit_watts == 700.0
    assert not act2.saved_path.exists()
    assert act2.status()["restored_on_start"] == ["gpu0"]


def test_restore_never_targets_a_different_board(tmp_path):
    gpu = MemoryGpu(uuid="GPU-A")
    act, _ = make(tmp_path, gpu)
    act.set_power_limit("gpu0", 300)
    other = MemoryGpu(uuid="GPU-B")  # same index after a reboot, but another board
    other.limit_watts = 500
    act2, _ = make(tmp_path, other)
    assert other.limit_watts == 500
    assert act2.saved_path.exists() and act2.status()["restore_errors"]


def test_unprivileged_runs_recommend_only_and_reports_once(tmp_path, caplog):
    gpu = MemoryGpu(privileged=False)
    with caplog.at_level("WARNING"):
        act, audit = make(tmp_path, gpu)
    st = act.status()
    assert st["mode"] == "recommend" and st["requested_mode"] == "enforce" and st["privileged"] is False
    assert "root" in st["message"]
    action = act.set_power_limit("gpu0", 300, reason="policy")
    assert action.outcome == "recommended" and gpu.limit_watts == 700.0
    act.set_power_limit("gpu0", 350)
    assert sum("recommend-only" in r.message for r in caplog.records) == 1
    assert audit.query(limit=1)[0]["outcome"] == "recommended"
    # validation still applies in recommend mode
    with pytest.raises(DeviceSettingError):
        act.set_power_limit("gpu0", 5000)


def test_recommend_mode_never_touches_devices(tmp_path):
    gpu = MemoryGpu()
    act, _ = make(tmp_path, gpu, mode="recommend")
    act.set_power_limit("gpu0", 300)
    act.set_locked_clocks("gpu0", 800, 800)
    act.reset_locked_clocks("gpu0")
    assert gpu.calls == [] and not act.saved_path.exists()
    assert act.status()["privileged"] is None


def test_permission_lost_mid_run_switches_to_recommend(tmp_path):
    gpu = MemoryGpu()
    act, _ = make(tmp_path, gpu)
    gpu.privileged = False
    with pytest.raises(DevicePermissionError):
        act.set_power_limit("gpu0", 300)
    assert act.mode == "recommend"


def _child_script(body: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        sys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]
        from power_test_devices import FileGpu
        from scheduler.power.actuator import PowerActuator
        from scheduler.power.exit_handlers import install_exit_handlers
        """
    ) + textwrap.dedent(body)


def _run_child(tmp_path, body):
    return subprocess.Popen([sys.executable, "-c", _child_script(body)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_line(proc, expected: str):
    line = proc.stdout.readline().strip()
    assert line == expected, f"child said {line!r}"


def test_restore_after_kill_9(tmp_path):
    dev_file = tmp_path / "board.json"
    proc = _run_child(tmp_path, f"""
        dev = FileGpu({str(dev_file)!r})
        act = PowerActuator({{"gpu0": dev}}, {str(tmp_path)!r})
        act.set_power_limit("gpu0", 250)
        act.set_locked_clocks("gpu0", 1000, 1000)
        print("changed", flush=True)
        time.sleep(60)
    """)
    try:
        _wait_for_line(proc, "changed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    board = FileGpu(dev_file)
    assert board.power_limit_watts() == 250 and board.locked_clocks_mhz() == (1000, 1000)
    act = PowerActuator({"gpu0": board}, tmp_path)
    assert board.power_limit_watts() == 700.0 and board.locked_clocks_mhz() is None
    assert not act.saved_path.exists()


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_restore_on_exit_and_sigterm(tmp_path, how):
    dev_file = tmp_path / "board.json"
    ending = "sys.exit(0)" if how == "exit" else "time.sleep(60)"
    proc = _run_child(tmp_path, f"""
        dev = FileGpu({str(dev_file)!r})
        act = PowerActuator({{"gpu0": dev}}, {str(tmp_path)!r})
        install_exit_handlers(act)
        act.set_power_limit("gpu0", 250)
        print("changed", flush=True)
        {ending}
    """)
    try:
        _wait_for_line(proc, "changed")
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    finally:
        proc.kill()
    assert rc == (0 if how == "exit" else 128 + signal.SIGTERM)
    assert FileGpu(dev_file).power_limit_watts() == 700.0
    assert not (tmp_path / "power" / "saved_settings.json").exists()


def test_audit_callback_counts_actions(tmp_path):
    seen = []
    audit = PowerAuditLog.in_state_dir(tmp_path, on_action=lambda r: seen.append((r.device_id, r.action)))
    gpu = MemoryGpu()
    act = PowerActuator({"gpu0": gpu}, tmp_path, audit=audit)
    act.set_power_limit("gpu0", 300)
    with pytest.raises(DeviceSettingError):
        act.set_power_limit("gpu0", 3000)
    assert seen == [("gpu0", "set_power_limit")]
    rows = audit.query(device_id="gpu0", outcome="refused")
    assert len(rows) == 1 and rows[0]["new_value"] == 3000
    assert audit.query(since_s=time.time() + 10) == []
