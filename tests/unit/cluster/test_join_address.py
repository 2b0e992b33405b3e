"""Joining a Ray cluster at an address where nothing listens fails in seconds with the address named.

Ray's own join retried for minutes there, printing GCS timeouts (`wattlane agent --address` with a typo in
the head's address looked hung)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from scheduler.cluster.runtime import check_reachable
from tests.support.server import free_port


def test_a_listening_address_passes_and_auto_is_left_to_ray():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1:{port}", "nothing accepts connections at 127.0.0.1:{port} (Connection refused)"),
    ("ray://127.0.0.1:{port}", "nothing accepts connections at 127.0.0.1:{port}"),
    ("no-such-host.invalid:6379", "nothing accepts connections at no-such-host.invalid:6379"),
    ("head-without-port", "is not 'auto', 'host:port' or 'ray://host:port'"),
])
def test_an_address_where_nothing_listens_is_a_clear_error(address, words):
    port = free_port()
    with pytest.raises(ConnectionError) as info:
        check_reachable(address.format(port=port), timeout_s=2.0)
    assert words.format(port=port) in str(info.value)


def test_the_agent_command_names_the_address_and_exits_at_once():
    port = free_port()
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "scheduler", "agent", "--address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert time.monotonic() - started < 60  # it waited minutes before
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}" in r.stderr and "Connection refused" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
