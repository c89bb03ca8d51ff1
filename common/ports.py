"""Local TCP ports: is something listening, and one that is free (loopback only)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing on 127.0.0.1 holds right now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0
