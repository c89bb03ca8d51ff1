"""The one loop every stage runs in: sockets, signals, heartbeats, counters, clean exit."""

from __future__ import annotations

import gc
import logging
import os
import time

import zmq

from common.bus import (
    HandshakeWatch,
    Publisher,
    Receiver,
    connect_pub,
    connect_sub,
    readable,
    recv_parts,
    wait_for_bus,
)
from common.config import BusConfig, session_id
from common.log import kv
from common.signals import StopFlag
from common.stage import SESSION_BEGIN, SESSION_TOPICS, Output, Stage, StageError

HEARTBEAT_INTERVAL_S = 1.0
MAX_MESSAGES_PER_TURN = 256  # keep the inbox and timers served under a flood
BUS_WAIT_LOG_INTERVAL_S = 5.0
BUS_SESSION_WAIT_S = 5.0  # the bus beats once a second; a loaded machine may be late by seconds


def _session_event(stage: Stage, message, log: logging.Logger) -> None:
    session = str(message.data.get("session") or "")
    if not session:
        raise ValueError(f"{message.topic} without data.session")
    previous = stage.adopt_session(session) if message.topic == SESSION_BEGIN else stage.out.stamper.session
    if previous != session:
        log.info(kv("session_begins", session=session, previous=previous))
    stage.on_session(message.topic, session, previous)


def _bus_session(ctx: zmq.Context, cfg: BusConfig, log: logging.Logger) -> str | None:
    """The session the bus stamps its heartbeat with: every process started without `VOICEBUS_SESSION`
    (each line of the Procfile under honcho) takes the bus's, so one pipeline is one conversation."""
    listener = Receiver(connect_sub(ctx, cfg, ["health.bus"]), "session")
    try:
        message = listener.recv(timeout_ms=int(1000 * BUS_SESSION_WAIT_S))
    finally:
        listener.sock.close(linger=0)
    if message is None:
        log.warning(kv("bus_session_unknown", waited_s=BUS_SESSION_WAIT_S, using="a session of this stage's own"))
        return None
    return message.header.session


def run_stage(stage: Stage, cfg: BusConfig) -> int:
    """Run `stage` until SIGINT/SIGTERM or until it finishes; return the process exit code."""
    log = logging.getLogger(f"voicebus.{stage.name}")
    stopping = StopFlag.install(lambda name: log.info(kv("stop_requested", signal=name)))

    ctx = zmq.Context()
    publisher = Publisher(connect_pub(ctx, cfg))
    receiver = Receiver(connect_sub(ctx, cfg, [*stage.subscriptions, *SESSION_TOPICS]), stage.name)
    stage.out = Output(stage.name, session_id(), publisher.send)
    thread_publisher = Publisher(connect_pub(ctx, cfg)) if stage.publishes_from_thread else None
    handler_errors = 0
    started = time.monotonic()
    beats = 0

    def heartbeat(state: str) -> None:
        nonlocal beats
        beats += 1  # 1 on the first: a watcher can tell whether it heard a stage from its start
        counters = {"state": state, "pid": os.getpid(), "beat": beats, "uptime_s": round(time.monotonic() - started, 1),
                    "in": receiver.received,
                    "out": publisher.sent + (thread_publisher.sent if thread_publisher else 0),
                    "bad": receiver.bad_total, "gaps": receiver.gaps,
                    "dropped": publisher.dropped + stage.inbox.dropped + (thread_publisher.dropped if thread_publisher
                                                                          else 0), "errors": handler_errors}
        counters.update(stage.counters())
        stage.out.event(f"health.{stage.name}", counters)

    try:
        handshake = HandshakeWatch(publisher.sock, cfg)
        while not stopping and not wait_for_bus(ctx, cfg, BUS_WAIT_LOG_INTERVAL_S, pub=publisher.sock,
                                                 sub=receiver.sock):
            log.warning(kv("waiting_for_bus", pub=cfg.pub, sub=cfg.sub, problem=repr(handshake.poll() or "no answer")))
        handshake.close()
        if not stopping and "VOICEBUS_SESSION" not in os.environ:  # started on its own (honcho, a terminal)
            stage.adopt_session(_bus_session(ctx, cfg, log) or stage.out.stamper.session)
        if thread_publisher is not None:  # attached to the proxy before its first frame, like ours above
            while not stopping and not wait_for_bus(ctx, cfg, BUS_WAIT_LOG_INTERVAL_S, pub=thread_publisher.sock):
                log.warning(kv("waiting_for_bus", pub=cfg.pub, socket="audio thread"))
            stage.thread_out = Output(stage.name, stage.out.stamper.session, thread_publisher.send)
        if stopping:
            return 0
        stage.start()
        # what exists now (modules, the stage's tables) lives as long as the process: keep it out of
        # every future collection, which otherwise walks it again and again from a cold cache
        gc.freeze()
        log.info(kv("started", subscriptions=",".join(stage.subscriptions) or "-", session=stage.out.stamper.session))
        poller = zmq.Poller()
        poller.register(receiver.sock, zmq.POLLIN)
        poller.register(stage.inbox.read_fd, zmq.POLLIN)
        wake_fd = stopping.wake_fd()  # a signal wakes the poll: no 20 Hz wakeups just to look at the flag
        poller.register(wake_fd, zmq.POLLIN)
        next_beat = time.monotonic()
        next_tick = time.monotonic()
        limit = MAX_MESSAGES_PER_TURN * (8 if stage.batch_interval_s else 1)
        while not stopping and not stage.finished:
            now = time.monotonic()
            if now >= next_beat:
                heartbeat("running")
                next_beat = now + HEARTBEAT_INTERVAL_S
            if stage.tick_interval_s and now >= next_tick:
                stage.tick()
                next_tick = now + (stage.tick_interval_s or 0.0)  # its tick may have ended what it ticked for
            wait_until = min(next_beat, next_tick) if stage.tick_interval_s else next_beat
            ready = dict(poller.poll(max(0, int((wait_until - now) * 1000) + 1)))
            if wake_fd in ready:
                stopping.drain_wake()
            if stage.batch_interval_s and receiver.sock in ready:
                time.sleep(stage.batch_interval_s)  # let frames queue; take them in one wake-up
            if stage.inbox.read_fd in ready:
                for item in stage.inbox.drain():
                    stage.on_inbox(item)
            if receiver.sock in ready:
                for _ in range(limit):
                    if not readable(receiver.sock):  # no exception per drain
                        break
                    message = receiver.accept(recv_parts(receiver.sock))
                    if message is None:
                        continue
                    try:
                        if message.topic in SESSION_TOPICS:
                            _session_event(stage, message, log)
                        else:
                            stage.handle(message)
                    except Exception:  # one bad message never kills a stage: count it, say where
                        handler_errors += 1
                        log.exception(kv("handler_error", topic=message.topic, src=message.header.src,
                                         seq=message.header.seq))
        return stage.exit_code
    except StageError as exc:
        log.error(kv("stage_error", stage=stage.name, error=repr(str(exc))))
        return 2
    except Exception:
        log.exception(kv("stage_failed", stage=stage.name))
        return 1
    finally:
        try:
            stage.stop()
        except Exception:
            log.exception(kv("stop_failed"))
        heartbeat("stopped")
        log.info(kv("stopped", out=publisher.sent, dropped=publisher.dropped,
                    bad=receiver.bad_total, gaps=receiver.gaps))
        publisher.sock.close(linger=200)
        if thread_publisher is not None:
            thread_publisher.sock.close(linger=200)
        receiver.sock.close(linger=0)
        stage.inbox.close()
        stopping.close()
        ctx.term()
