"""free_port (tests, bench, devpki): a port outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from hsmocsp.devpki.bao import free_port


def test_ports_come_from_below_the_ephemeral_range_and_can_be_bound() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in ports:
        assert 1024 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))

