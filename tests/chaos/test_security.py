"""Nothing listens beyond loopback, the run dir is private, CURVE keeps strangers off a tcp bus."""

from __future__ import annotations

import os
import stat

from tests.helpers import BusClient


def _listening_on(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if int(port_hex, 16) == port and state == "0A":
                    found.append(address)
    return found


def test_simulator_binds_loopback_only_by_default(simulator, chaos_record):
    url = simulator()
    port = int(url.split(":")[2].split("/")[0])
    addresses = _listening_on(port)
    assert addresses and all(a == "0100007F" for a in addresses), addresses  # 127.0.0.1
    chaos_record(case="simulator binds 127.0.0.1 by default", tried=1, survived=1, lost=0)


def test_ipc_sockets_live_in_a_private_run_dir(bus, run_dir, chaos_record):
    client = BusClient(bus, ["health."])
    try:
        client.wait_for(lambda m: m.topic == "health.bus", timeout_s=10)
    finally:
        client.close()
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    sockets = [p for p in run_dir.iterdir() if stat.S_ISSOCK(p.stat().st_mode)]
    assert {p.name for p in sockets} == {"pub.sock", "sub.sock"}
    chaos_record(case="ipc run dir 0700 (sockets unreachable for other users)", tried=1, survived=1, lost=0)
