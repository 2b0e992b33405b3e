"""The tests' free ports come from outside the kernel's ephemeral range, where Ray's processes cannot take them.

A server the tests start in a subprocess binds its port seconds after the port was chosen; Ray's processes
bind port 0 meanwhile, and once took the chosen port first (Serve's proxy: "Failed to bind to address")."""

from __future__ import annotations

import socket

from tests.support.server import PORT_RANGE_START, ephemeral_port_range, free_port


def test_free_ports_are_outside_the_ephemeral_range_and_can_be_bound() -> None:
    low, _ = ephemeral_port_range()
    ports = [free_port() for _ in range(50)]
    assert all(PORT_RANGE_START <= p < low for p in ports), ports
    assert len(set(ports)) > 1, "chosen at random, so that servers started together do not race for one port"
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
