"""The capture file: an append-only log of bus messages exactly as they were received.

    file     = MAGIC record*
    record   = u32 length (little endian) | u32 crc32 of body | body
    body     = msgpack [t_recv_ns, [frame, frame, ...]]   (frames are the raw ZeroMQ frames)

Each record is written with one write() and flushed, so a killed writer leaves whole records plus
at most one cut-off tail; readers stop at the first incomplete or corrupt record and say how many
bytes they could not use.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

MAGIC = b"VOICEBUS-CAPTURE-1\n"
RECORD_HEAD = struct.Struct("<II")
MAX_RECORD_BYTES = 16 * 1024 * 1024


class CaptureError(ValueError):
    pass


@dataclass(frozen=True)
class Record:
    t_recv_ns: int
    frames: list[bytes]

    @property
    def topic(self) -> str:
        return self.frames[0].decode("ascii", "replace") if self.frames else ""


class CaptureWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        if fresh:
            self._file.write(MAGIC)
            self._file.flush()
        self.records = 0
        self.bytes = 0

    def write(self, t_recv_ns: int, frames: list[bytes]) -> None:
        body = msgpack.packb([t_recv_ns, [bytes(f) for f in frames]], use_bin_type=True)
        self._file.write(RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body)
        self._file.flush()
        self.records += 1
        self.bytes += RECORD_HEAD.size + len(body)

    def close(self) -> None:
        self._file.close()


@dataclass
class ReadReport:
    records: int = 0
    lost_bytes: int = 0  # at the end: a cut-off or corrupt tail
    reason: str = ""
    malformed: int = 0  # whole records (checksum good) whose content is not [t_recv_ns, [bytes, ...]]: skipped


def read_capture(path: str | Path, report: ReadReport | None = None) -> Iterator[Record]:
    """Yield every whole record; fill `report` with what could not be read (and why)."""
    report = report if report is not None else ReadReport()
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CaptureError(f"{path}: not a voicebus capture file (no {MAGIC.strip().decode()} header)")
        size = path.stat().st_size
        while True:
            start = f.tell()
            head = f.read(RECORD_HEAD.size)
            if not head:
                return
            if len(head) < RECORD_HEAD.size:
                report.lost_bytes, report.reason = size - start, "cut off in a record header"
                return
            length, crc = RECORD_HEAD.unpack(head)
            body = f.read(length) if length <= MAX_RECORD_BYTES else b""
            if length > MAX_RECORD_BYTES or len(body) < length:
                report.lost_bytes, report.reason = size - start, "cut off in a record"
                return
            if zlib.crc32(body) != crc:
                report.lost_bytes, report.reason = size - start, "checksum mismatch"
                return
            try:
                t_recv_ns, frames = msgpack.unpackb(body, raw=False)
            except Exception:  # a record that passed the checksum but is not ours: stop, say so
                report.lost_bytes, report.reason = size - start, "undecodable record"
                return
            report.records += 1
            if not (isinstance(t_recv_ns, int) and isinstance(frames, list)
                    and all(isinstance(x, bytes | bytearray) for x in frames)):
                report.malformed += 1  # written by something else: counted, and the rest still read
                continue
            yield Record(t_recv_ns, [bytes(x) for x in frames])
