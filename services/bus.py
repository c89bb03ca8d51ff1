"""`voicebus bus`: the XSUB/XPUB proxy every stage connects to.

Publishers connect to the XSUB side, subscribers to the XPUB side; `zmq.proxy_steerable` forwards
messages one way and subscriptions the other. A slow subscriber fills its own XPUB queue and loses
messages there (receivers see seq gaps); no publisher is ever stalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

import zmq

from common.bus import AUTHORIZED_DIR, apply_server_curve, bus_may_answer, connect_pub, wait_for_bus
from common.config import BusConfig, session_id
from common.envelope import Stamper, encode
from common.log import kv
from common.signals import StopFlag

PROXY_HWM = 50_000
HEARTBEAT_INTERVAL_S = 1.0
CONTROL_ENDPOINT = "inproc://voicebus-bus-control"

log = logging.getLogger("voicebus.bus")


class BusRefused(RuntimeError):
    pass


def _proxy(xsub: zmq.Socket, xpub: zmq.Socket, control: zmq.Socket) -> None:
    try:
        zmq.proxy_steerable(xsub, xpub, None, control)
    except zmq.ContextTerminated:
        pass
    finally:
        for sock in (xsub, xpub, control):
            sock.close(linger=0)


def run_bus(cfg: BusConfig, insecure: bool = False) -> int:
    if cfg.is_tcp and cfg.curve_dir is None and not insecure:
        raise BusRefused("a tcp:// bus needs CURVE keys: create them with `voicebus keys -o DIR` and pass "
                         "--curve-dir DIR (or VOICEBUS_CURVE_DIR), or accept an open bus with --insecure")
    ctx = zmq.Context()
    if bus_may_answer(cfg) and wait_for_bus(ctx, cfg, timeout_s=0.3):
        ctx.term()
        raise BusRefused(f"a bus already answers at {cfg.pub} / {cfg.sub}; not starting a second one")
    authenticator = None
    if cfg.is_tcp and cfg.curve_dir is not None:
        from zmq.auth.thread import ThreadAuthenticator  # asyncio and ssl: only on a CURVE bus

        authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("voicebus.bus.auth"))
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(cfg.curve_dir / AUTHORIZED_DIR))

    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    xsub.rcvhwm = xpub.sndhwm = PROXY_HWM
    for sock, endpoint in ((xsub, cfg.pub), (xpub, cfg.sub)):
        if authenticator is not None:
            apply_server_curve(sock, cfg.curve_dir)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise BusRefused(f"cannot bind {endpoint}: {exc}") from exc
    control_server = ctx.socket(zmq.PAIR)
    control_server.bind(CONTROL_ENDPOINT)
    control = ctx.socket(zmq.PAIR)
    control.connect(CONTROL_ENDPOINT)
    thread = threading.Thread(target=_proxy, args=(xsub, xpub, control_server), name="proxy", daemon=True)
    thread.start()

    stopping = StopFlag.install()
    wake_fd = stopping.wake_fd()
    heartbeat = connect_pub(ctx, cfg)
    stamper = Stamper("bus", session_id())
    started = time.monotonic()
    beats = 0
    log.info(kv("bus_ready", pub=cfg.pub, sub=cfg.sub, curve=authenticator is not None, session=stamper.session))
    try:
        while not stopping:
            beats += 1  # as a stage's (common.runner)
            data = {"state": "running", "pid": os.getpid(), "beat": beats, "uptime_s": round(time.monotonic() - started, 1)}
            heartbeat.send_multipart(encode(stamper.event("health.bus", data, time.time_ns())), flags=zmq.NOBLOCK)
            deadline = time.monotonic() + HEARTBEAT_INTERVAL_S
            while not stopping and (left := deadline - time.monotonic()) > 0:
                if select.select([wake_fd], [], [], left)[0]:  # a signal: look at the flag at once
                    stopping.drain_wake()
    finally:
        control.send(b"TERMINATE")
        thread.join(timeout=1.0)
        heartbeat.close(linger=0)
        control.close(linger=0)
        if authenticator is not None:
            authenticator.stop()
        ctx.term()
        stopping.close()
        for endpoint in (cfg.pub, cfg.sub):  # zmq leaves a bound ipc:// socket's file behind
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint.removeprefix("ipc://"))
        log.info(kv("bus_stopped"))
    return 0
