"""The real bus process on real ipc:// and tcp:// sockets: fuzzing, gaps, HWM, CURVE, run dir."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.bus import Receiver, bus_may_answer, connect_pub, connect_sub, generate_keys, wait_for_bus
from common.config import BusConfig, bus_config, run_dir
from common.envelope import EnvelopeError, Stamper, decode, encode
from tests.helpers import BusClient

VALID_HEADER = {"v": 1, "src": "fuzz", "seq": 0, "t_ns": 1, "session": "s"}
frame_sets = st.lists(
    st.one_of(st.binary(max_size=40), st.just(b"rt.x"), st.just(b"audio.user"),
              st.just(msgpack.packb(VALID_HEADER)),
              st.builds(lambda d: msgpack.packb({**VALID_HEADER, **d}),
                        st.dictionaries(st.sampled_from(["seq", "rate", "pts", "v"]), st.integers(-5, 70000)))),
    min_size=1, max_size=4)


def test_fuzzed_frames_through_real_proxy_are_all_counted(bus):
    """Random multipart frames through the real proxy: the subscriber never raises and counts every bad one."""
    ctx = zmq.Context()
    pub = connect_pub(ctx, bus)
    receiver = Receiver(connect_sub(ctx, bus, [""]), "fuzz")
    # with the receiver's own socket: until its "" subscription reaches the proxy, frames are not
    # forwarded to it (under load the first ~40 were lost and the count came up short)
    assert wait_for_bus(ctx, bus, pub=pub, sub=receiver.sock)
    expected = {"good": 0, "bad": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frame_sets)
    def throw(frames):
        try:
            decode(frames)
            expected["good"] += 1
        except EnvelopeError:
            expected["bad"] += 1
        pub.send_multipart(frames)

    try:
        throw()
        sentinel = Stamper("sentinel", "s").event("zz.end", {}, 1)
        pub.send_multipart(encode(sentinel))
        deadline = time.monotonic() + 10
        seen_sentinel = False
        fuzz_good = 0
        while time.monotonic() < deadline and not seen_sentinel:
            message = receiver.recv(timeout_ms=100)
            seen_sentinel = message is not None and message.topic == "zz.end"
            fuzz_good += message is not None and message.header.src == "fuzz"
        assert seen_sentinel
        assert receiver.bad_total == expected["bad"] > 0
        assert fuzz_good == expected["good"]
    finally:
        pub.close(0)
        receiver.sock.close(0)
        ctx.term()


def test_seq_gaps_are_counted_by_tap(bus, procs):
    tap = procs.voicebus("tap", "demo.", "--json", "--count", "3", "--stats", "0", stdout=subprocess.PIPE)
    client = BusClient(bus, ["demo."])
    try:
        # wait until tap's subscription reached the proxy: it receives its own warm-up topic
        stamper = Stamper("gappy", "s")
        time.sleep(0.5)  # tap subscribes asynchronously; nothing observable to wait on without a message
        for seq in (0, 1, 4):
            stamper.seqs["demo.x"] = seq
            client.publisher.send(stamper.event("demo.x", {"n": seq}, time.time_ns()))
        out, _ = tap.communicate(timeout=10)
    finally:
        client.close()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [row["seq"] for row in lines[:3]] == [0, 1, 4]
    assert lines[-1]["stats"]["gaps"] == 2


def test_stalled_subscriber_does_not_stall_publisher_or_others(bus):
    ctx = zmq.Context()
    stalled = connect_sub(ctx, bus, [""])  # never read
    fast = connect_sub(ctx, bus, ["load."])
    pub = connect_pub(ctx, bus)
    assert wait_for_bus(ctx, bus, pub=pub)
    time.sleep(0.2)
    total = 150_000
    received = {"n": 0}
    done = threading.Event()

    def reader():
        while not done.is_set() or fast.poll(0):
            if fast.poll(50):
                fast.recv_multipart()
                received["n"] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    stamper = Stamper("load", "s")
    header = encode(stamper.event("load.x", {}, 1))
    started = time.monotonic()
    for i in range(total):
        pub.send_multipart(header, flags=zmq.NOBLOCK)
        if i % 2000 == 0:
            time.sleep(0.01)  # ~150k msg/s at most: the fast reader keeps up
    publish_s = time.monotonic() - started
    deadline = time.monotonic() + 15
    while received["n"] < total and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join()
    stalled_queued = 0
    while stalled.poll(0):
        stalled.recv_multipart()
        stalled_queued += 1
    for sock in (stalled, fast, pub):
        sock.close(0)
    ctx.term()
    assert received["n"] == total, f"fast subscriber got {received['n']}/{total} (publish took {publish_s:.1f}s)"
    assert stalled_queued < total  # the stalled one lost messages at the proxy instead of stalling it


def _free_port() -> int:
    """A port p with p and p+1 both free right now."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no pair of free ports")


def test_tcp_bus_refuses_to_start_without_keys(procs):
    port = _free_port()
    proc = procs.voicebus("bus", "--pub", f"tcp://127.0.0.1:{port}", "--sub", f"tcp://127.0.0.1:{port + 1}")
    assert proc.wait(timeout=10) != 0
    assert "needs CURVE keys" in procs.log_of(proc)


def test_tcp_bus_with_curve_accepts_right_key_and_refuses_wrong_one(procs, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys)
    port = _free_port()
    cfg = BusConfig(pub=f"tcp://127.0.0.1:{port}", sub=f"tcp://127.0.0.1:{port + 1}", curve_dir=keys)
    procs.voicebus("bus", "--pub", cfg.pub, "--sub", cfg.sub, "--curve-dir", str(keys))
    ctx = zmq.Context()
    try:
        assert wait_for_bus(ctx, cfg, timeout_s=10), "a client with the right key must get through"
        intruder_keys = tmp_path / "intruder"
        generate_keys(intruder_keys)
        # the intruder has a valid-looking keypair for the right server key, but is not authorized
        (intruder_keys / "server.key").write_bytes((keys / "server.key").read_bytes())
        intruder = BusConfig(pub=cfg.pub, sub=cfg.sub, curve_dir=intruder_keys)
        assert not wait_for_bus(ctx, intruder, timeout_s=2), "an unauthorized key must get nothing"
        no_key = BusConfig(pub=cfg.pub, sub=cfg.sub, curve_dir=None)
        assert not wait_for_bus(ctx, no_key, timeout_s=1), "a peer without CURVE must get nothing"
    finally:
        ctx.term()
    # and a peer that gets nothing is told why, instead of printing "0 msgs" forever
    for name, curve_args, reason in (("tap-nokey", [], "uses CURVE and this process has no keys"),
                                     ("tap-intruder", ["--curve-dir", str(intruder_keys)], "do not match")):
        tap = procs.voicebus("tap", "--pub", cfg.pub, "--sub", cfg.sub, *curve_args, "--duration", "2.5",
                             "--stats", "1", name=name)
        assert tap.wait(timeout=20) == 1  # nothing can arrive: said, and not a success
        assert reason in procs.log_of(tap) and "no bus answers" in procs.log_of(tap), procs.log_of(tap)


def test_insecure_tcp_bus_starts_when_asked(procs):
    port = _free_port()
    cfg = BusConfig(pub=f"tcp://127.0.0.1:{port}", sub=f"tcp://127.0.0.1:{port + 1}")
    procs.voicebus("bus", "--pub", cfg.pub, "--sub", cfg.sub, "--insecure")
    ctx = zmq.Context()
    try:
        assert wait_for_bus(ctx, cfg, timeout_s=10)
    finally:
        ctx.term()


def test_second_bus_on_same_endpoints_refuses(bus, procs, client_factory):
    client_factory(["health."])  # the first bus answers
    proc = procs.voicebus("bus", name="bus2")
    assert proc.wait(timeout=10) != 0
    assert "already answers" in procs.log_of(proc)


def test_only_an_ipc_socket_file_that_is_there_or_an_address_without_one_is_probed_for_a_bus(tmp_path):
    """The probe (0.3 s) is skipped only where no bus can answer: a socket file missing at an ipc://
    path (a probe goes through both sides); a stale file left behind is probed."""
    cfg = BusConfig(pub=f"ipc://{tmp_path}/pub.sock", sub=f"ipc://{tmp_path}/sub.sock")
    assert not bus_may_answer(cfg)
    (tmp_path / "sub.sock").touch()
    assert not bus_may_answer(cfg)
    (tmp_path / "pub.sock").touch()
    assert bus_may_answer(cfg)
    assert bus_may_answer(BusConfig(pub="ipc://@vb-test-pub", sub="ipc://@vb-test-sub"))
    assert bus_may_answer(BusConfig(pub="tcp://127.0.0.1:5555", sub="tcp://127.0.0.1:5556"))


def test_default_run_dir_is_private(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "run"
    monkeypatch.setenv("VOICEBUS_RUN_DIR", str(target))
    monkeypatch.delenv("VOICEBUS_BUS_PUB", raising=False)
    monkeypatch.delenv("VOICEBUS_BUS_SUB", raising=False)
    cfg = bus_config()
    assert cfg.pub == f"ipc://{target}/bus-pub.sock"
    assert stat.S_IMODE(os.stat(run_dir()).st_mode) == 0o700
    os.chmod(target, 0o755)  # a loosened dir is tightened again on next use
    run_dir()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
