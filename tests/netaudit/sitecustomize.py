"""Loaded by every Python process a test starts with this folder on PYTHONPATH and VOICEBUS_NET_AUDIT
set: each DNS lookup or connection to a host that is not loopback is written to that file and refused
(nothing leaves the machine), and at exit the process says whether weave's Sentry client was live.

Each process also writes a `start` line, so a test can tell an audited run from one the hook missed."""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import socket
import sys

AUDIT = os.environ.get("VOICEBUS_NET_AUDIT")


def _write(record: dict) -> None:
    with open(AUDIT, "a") as f:  # type: ignore[arg-type]
        f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], **record}) + "\n")


def _loopback(host) -> bool:
    if host is None or host in ("", "localhost", "localhost.localdomain", b"localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


if AUDIT:
    _getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            _write({"event": "lookup", "host": str(host)})
            raise socket.gaierror(socket.EAI_NONAME, f"voicebus net audit: {host} is not loopback")
        return _getaddrinfo(host, *args, **kwargs)

    def _check(sock, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _write({"event": "connect", "host": str(address[0])})
            raise ConnectionRefusedError(f"voicebus net audit: {address[0]} is not loopback")

    def connect(self, address):
        _check(self, address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return _connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    _write({"event": "start"})

    @atexit.register
    def _at_exit() -> None:
        sentry = sys.modules.get("weave.telemetry.trace_sentry")
        _write({"event": "exit", "weave": "weave" in sys.modules,
                "sentry_enabled": bool(sentry is not None and not sentry.global_trace_sentry._disabled)})
