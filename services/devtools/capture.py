"""`voicebus capture`: record bus messages, raw and exactly as received, into a capture file.

It records what it receives, nothing else: no environment, no configuration, so a capture can be
shared. A full or read-only disk is reported once, counted, and retried; the bus is never slowed.
"""

from __future__ import annotations

import logging
import time

import click
import zmq

from common.bus import NO_BUS_WAIT_S, connect_sub, no_bus_message, wait_for_bus
from common.capture_file import CaptureWriter
from common.config import BusConfig
from common.log import kv
from common.signals import StopFlag

RETRY_WRITE_S = 5.0
PROGRESS_INTERVAL_S = 5.0

log = logging.getLogger("voicebus.capture")


def run_capture(cfg: BusConfig, path: str, prefixes: list[str], duration_s: float | None, count: int | None) -> int:
    stopping = StopFlag.install()
    ctx = zmq.Context()
    sock = connect_sub(ctx, cfg, prefixes)
    if not wait_for_bus(ctx, cfg, NO_BUS_WAIT_S, sub=sock):  # before the file: no bus, no empty capture
        sock.close(linger=0)
        ctx.term()
        raise click.ClickException(no_bus_message(cfg))
    try:
        writer = CaptureWriter(path)
    except OSError as exc:
        sock.close(linger=0)
        ctx.term()
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from exc
    failed_writes = 0
    write_blocked_until = 0.0
    started = last_progress = time.monotonic()
    log.info(kv("capturing", path=path, topics=",".join(prefixes) or "*"))
    try:
        while not stopping:
            now = time.monotonic()
            if duration_s is not None and now - started >= duration_s:
                break
            if now - last_progress >= PROGRESS_INTERVAL_S:
                log.info(kv("progress", records=writer.records, mb=round(writer.bytes / 1e6, 2),
                            failed_writes=failed_writes))
                last_progress = now
            if not sock.poll(100):
                continue
            frames = sock.recv_multipart()
            if now < write_blocked_until:
                failed_writes += 1
                continue
            try:
                writer.write(time.time_ns(), frames)
            except OSError as exc:
                failed_writes += 1
                write_blocked_until = now + RETRY_WRITE_S
                log.error(kv("write_failed", path=path, error=repr(exc.strerror), dropped_so_far=failed_writes,
                             retry_in_s=RETRY_WRITE_S))
            if count is not None and writer.records >= count:
                break
    finally:
        try:
            writer.close()
        except OSError:
            pass
        sock.close(0)
        ctx.term()
        log.info(kv("captured", path=path, records=writer.records, mb=round(writer.bytes / 1e6, 2),
                    not_written=failed_writes))
    return 1 if failed_writes else 0
