"""Sockets on the bus: a publisher that never blocks, a receiver that never dies on bad input.

Every stage connects both ways to the proxy (`voicebus bus`); nothing but the proxy binds. On tcp://
the proxy is a CURVE server and every peer needs the client keypair from `voicebus keys`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

import zmq

from common.config import BusConfig
from common.envelope import EnvelopeError, Message, Stamper, decode, encode
from common.log import RateLimitedLog

SEND_HWM = 20_000  # ~6 min of 20 ms audio frames: a stalled peer makes the proxy drop, never us block
RECV_HWM = 20_000
LINGER_MS = 200
RECONNECT_FIRST_MS = 10  # a connect retried after 10 ms, then 20, 40 ... (see _secure)
RECONNECT_MAX_MS = 100
SERVER_KEY = "server"
CLIENT_KEY = "client"
AUTHORIZED_DIR = "authorized"
PROBE_TOPIC = "bus.probe"

log = logging.getLogger("voicebus.bus")


class CurveKeyError(RuntimeError):
    pass


def generate_keys(directory: Path) -> dict[str, Path]:
    """Write a server and a client keypair, and authorize the client's public key."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    import zmq.auth

    server_public, server_secret = zmq.auth.create_certificates(directory, SERVER_KEY)
    client_public, client_secret = zmq.auth.create_certificates(directory, CLIENT_KEY)
    authorized = directory / AUTHORIZED_DIR
    authorized.mkdir(exist_ok=True)
    (authorized / Path(client_public).name).write_bytes(Path(client_public).read_bytes())
    for secret in (server_secret, client_secret):
        Path(secret).chmod(0o600)
    return {"server_public": Path(server_public), "server_secret": Path(server_secret),
            "client_public": Path(client_public), "client_secret": Path(client_secret),
            "authorized": authorized}


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = directory / (f"{name}.key_secret" if secret else f"{name}.key")
    if not path.exists():
        raise CurveKeyError(f"missing CURVE key {path} (create keys with `voicebus keys -o {directory}`)")
    import zmq.auth

    return zmq.auth.load_certificate(path)


def apply_client_curve(sock: zmq.Socket, curve_dir: Path) -> None:
    server_public, _ = _load(curve_dir, SERVER_KEY, secret=False)
    client_public, client_secret = _load(curve_dir, CLIENT_KEY, secret=True)
    sock.curve_serverkey = server_public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret


def apply_server_curve(sock: zmq.Socket, curve_dir: Path) -> None:
    public, secret = _load(curve_dir, SERVER_KEY, secret=True)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _secure(sock: zmq.Socket, cfg: BusConfig) -> None:
    if cfg.is_tcp and cfg.curve_dir is not None:
        apply_client_curve(sock, cfg.curve_dir)
    # a socket that connects before the bus has bound (the launcher's, the moment it forks the bus) or
    # that lost it (a bus restart) retries after 10 ms, then 20, 40 ... up to ZeroMQ's usual 100 ms,
    # not after a flat 100 ms: ~0.1 s off every stage set's start
    sock.reconnect_ivl = RECONNECT_FIRST_MS
    sock.reconnect_ivl_max = RECONNECT_MAX_MS


def connect_pub(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    sock = ctx.socket(zmq.PUB)
    sock.sndhwm = SEND_HWM
    sock.linger = LINGER_MS
    _secure(sock, cfg)
    sock.connect(cfg.pub)
    return sock


def connect_sub(ctx: zmq.Context, cfg: BusConfig, prefixes: list[str]) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.rcvhwm = RECV_HWM
    sock.linger = 0
    _secure(sock, cfg)
    for prefix in prefixes or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("ascii"))
    sock.connect(cfg.sub)
    return sock


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


HANDSHAKE_VERDICT_S = 2.0  # a tcp:// bus that says nothing: how long its refusal may take to arrive


class HandshakeWatch:
    """Why a tcp:// bus stays silent: ZeroMQ's monitor events for one socket's security handshake.

    A peer without keys (or with the wrong ones) on a CURVE bus is simply never connected; without
    this, a subscriber only sees nothing arrive.
    """

    def __init__(self, sock: zmq.Socket, cfg: BusConfig) -> None:
        self.cfg = cfg
        self.problem: str | None = None
        self._sock = sock
        self._monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS) if cfg.is_tcp else None

    def poll(self) -> str | None:
        """The current problem (None once a handshake succeeded), reading the events so far."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.problem = None
            elif self.cfg.curve_dir is None:
                self.problem = (f"the bus at {self._sock.last_endpoint.decode() or self.cfg.sub} refuses the "
                                "connection: it uses CURVE and this process has no keys (pass --curve-dir or set "
                                "VOICEBUS_CURVE_DIR to the directory made by `voicebus keys`)")
            else:
                self.problem = (f"CURVE handshake with the bus failed: the keys in {self.cfg.curve_dir} do not match "
                                "the bus's (another server key, or this client key is not in its authorized dir)")
        return self.problem

    def verdict(self, within_s: float = HANDSHAKE_VERDICT_S) -> str | None:
        """The problem, waiting up to `within_s` for a handshake's outcome when none has come yet: a CURVE
        refusal takes the bus's authenticator a round trip, and on a loaded machine longer than the wait
        for a first message did (the reason was then left out of what the user was told)."""
        deadline = time.monotonic() + within_s
        while self.poll() is None and self._monitor is not None and time.monotonic() < deadline:
            self._monitor.poll(int(1000 * max(0.0, deadline - time.monotonic())))
        return self.problem

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None


# pyzmq's flags and options are enum members: `zmq.SNDMORE | flags` in its send_multipart, and
# `getsockopt(zmq.EVENTS) & zmq.POLLIN`, build a new enum.Flag through enum's Python code each time.
# Per 20 ms frame that was ~15 % of the resample stage's Python time (py-spy); as ints it is an `or`.
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE) | NOBLOCK
RCVMORE, EVENTS, POLLIN = int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)


def send_parts(sock: zmq.Socket, parts: list) -> None:
    """`send_multipart(parts, flags=NOBLOCK, copy=False)` with int flags; raises zmq.Again."""
    last = len(parts) - 1
    for index, part in enumerate(parts):
        sock.send(part, MORE_NOBLOCK if index < last else NOBLOCK, copy=False)


def readable(sock: zmq.Socket) -> bool:
    """A message is waiting (ZMQ_EVENTS): a drain loop's test, with no exception at its end."""
    return bool(sock.getsockopt(EVENTS) & POLLIN)


def recv_parts(sock: zmq.Socket) -> list[bytes]:
    """`recv_multipart(flags=NOBLOCK)` with int flags; raises zmq.Again when nothing waits."""
    parts = [sock.recv(NOBLOCK)]
    while sock.getsockopt(RCVMORE):
        parts.append(sock.recv(NOBLOCK))
    return parts


class Publisher:
    """Sends without ever blocking: if ZeroMQ's queue is full the message is dropped and counted."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.sent = 0
        self.dropped = 0

    def send(self, message: Message) -> bool:
        try:
            send_parts(self.sock, encode(message))
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True


class Receiver:
    """Decodes what a SUB socket delivers; counts bad messages by reason and seq gaps per (src, topic)."""

    def __init__(self, sock: zmq.Socket, name: str = "receiver") -> None:
        self.sock = sock
        self.received = 0
        self.bad: Counter[str] = Counter()
        self.gaps = 0
        self._last_seq: dict[tuple[str, str], int] = {}
        self._warn = RateLimitedLog(logging.getLogger(f"voicebus.{name}"))

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next valid message, or None on timeout or on a bad one (which is counted)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart()
        return self.accept(frames)

    def accept(self, frames: list[bytes]) -> Message | None:
        try:
            message = decode(frames)
        except EnvelopeError as exc:
            self.bad[exc.reason] += 1
            self._warn.warning(exc.reason, f"bad_message reason={exc.reason} detail={exc}")
            return None
        self.received += 1
        self._count_gap(message)
        return message

    def _count_gap(self, message: Message) -> None:
        key, seq = (message.header.src, message.topic), message.header.seq
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if last is None or seq <= last:  # first message, or the publisher restarted
            return
        if seq > last + 1:
            self.gaps += seq - last - 1


NO_BUS_WAIT_S = 3.0  # how long a user's tool (tap, capture, replay) waits before saying there is no bus


def no_bus_message(cfg: BusConfig, problem: str | None = None) -> str:
    """What a tool that needs a running bus tells the user when none answers."""
    return (f"no bus answers at {cfg.pub}" + (f" ({problem})" if problem else "") +
            ": start the pipeline with `voicebus up` (or only the bus: `voicebus bus`), or point --pub/--sub "
            "(VOICEBUS_BUS_PUB/VOICEBUS_BUS_SUB, or VOICEBUS_RUN_DIR of that `up`) at the running one")


def bus_may_answer(cfg: BusConfig) -> bool:
    """False when no bus can be bound there (an ipc:// socket file that does not exist): then the
    0.3 s probe for one, which the launcher and the bus would each make, is skipped (the bus's was
    0.3 s of a forked stage set's 0.77 s start, bench_start)."""
    for endpoint in (cfg.pub, cfg.sub):
        path = endpoint.removeprefix("ipc://")
        if endpoint.startswith("ipc://") and not path.startswith("@") and not os.path.exists(path):
            return False  # (an abstract socket, ipc://@name, has no file to look for)
    return True


def wait_for_bus(ctx: zmq.Context, cfg: BusConfig, timeout_s: float = 10.0, pub: zmq.Socket | None = None,
                 sub: zmq.Socket | None = None) -> bool:
    """True once a probe published on the bus comes back through the proxy.

    Pass the sockets you will use. Once a probe from your own PUB has come back, the proxy has
    attached it and sent it the current subscriptions (no slow-joiner loss of your first messages);
    once it comes back on your own SUB, the subscriptions you made before it have reached the proxy.
    Messages your SUB receives meanwhile are discarded: nothing has started yet.
    """
    own_pub, own_sub = pub is None, sub is None
    pub = connect_pub(ctx, cfg) if pub is None else pub
    sub = connect_sub(ctx, cfg, [PROBE_TOPIC]) if sub is None else sub
    if not own_sub:
        sub.setsockopt(zmq.SUBSCRIBE, PROBE_TOPIC.encode())
    stamper = Stamper("probe", "")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            pub.send_multipart(encode(stamper.event(PROBE_TOPIC, {}, time.time_ns())), flags=zmq.NOBLOCK)
            end = time.monotonic() + 0.05
            while sub.poll(max(0, int((end - time.monotonic()) * 1000))):
                if sub.recv_multipart()[0] == PROBE_TOPIC.encode():
                    return True
        return False
    finally:
        if own_pub:
            pub.close(0)
        if own_sub:
            sub.close(0)
        else:
            sub.setsockopt(zmq.UNSUBSCRIBE, PROBE_TOPIC.encode())
