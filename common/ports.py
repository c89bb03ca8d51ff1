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


def port_answers(port: int, host: str = "127.0.0.1", timeout_s: float = 0.2) -> bool:
    """An HTTP server on `port` has taken a connection and answered it: ready, not only listening.

    A socket bound and listening on a server's behalf (the launcher binds the simulator's port, so it
    cannot be taken) accepts connections into its backlog before the server behind it runs."""
    with socket.socket() as probe:
        probe.settimeout(timeout_s)
        try:
            probe.connect((host, port))
            probe.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            return probe.recv(1) != b""
        except OSError:
            return False
