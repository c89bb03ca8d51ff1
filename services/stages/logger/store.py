"""The durable local store: one directory per session, written before anything is sent anywhere.

    <root>/<session>/meta.json        session facts (model, protocol, start, end, totals)
    <root>/<session>/events.jsonl     append-only: errors, reconnects, barge-ins, drops, as they happen
    <root>/<session>/turns.jsonl      append-only, fsynced: one line per completed turn
    <root>/<session>/audio/*.wav      each turn's user audio, assistant audio as played and as generated
    <root>/<session>/upload.json      what the uploader has confirmed on the trace server

A turn's WAVs are written and fsynced before its line goes into turns.jsonl, so a line always has its
audio; a kill -9 loses at most the turn in progress. Reopening a session continues it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.wavio import write_wav

RATE = 24_000


def data_dir(variable: str, leaf: str) -> Path:
    """`$variable` if set, else `$XDG_DATA_HOME/voicebus/<leaf>` (~/.local/share/voicebus/<leaf>)."""
    configured = os.environ.get(variable)
    if configured:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(data_home) / "voicebus" / leaf


def default_root() -> Path:
    return data_dir("VOICEBUS_TRACE_DIR", "sessions")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SessionStore:
    def __init__(self, root: Path, session: str) -> None:
        self.dir = root / session
        self.audio_dir = self.dir / "audio"
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        self.session = session
        self.keys = {turn["key"] for turn in load_turns(self.dir)}  # resume: never store a turn twice
        self.next_index = len(self.keys) + 1
        self.meta = load_json(self.dir / "meta.json") or {"session": session}

    def write_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        _atomic_write(self.dir / "meta.json", json.dumps(self.meta, indent=1, default=str))

    def event(self, record: dict[str, Any]) -> None:
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def write_turn(self, turn: dict[str, Any], audio: dict[str, bytes]) -> bool:
        """Store a completed turn with its audio; False if it was stored before (a resumed session)."""
        if turn["key"] in self.keys:
            return False
        turn["turn"] = self.next_index
        files = {}
        for name, pcm in audio.items():
            path = write_wav(self.audio_dir / f"turn-{self.next_index:03d}-{name}.wav", pcm, turn.get("audio_rate") or RATE)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = str(path.relative_to(self.dir))
        turn["audio_files"] = files
        with open(self.dir / "turns.jsonl", "a") as f:
            f.write(json.dumps(turn, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.dir)
        self.keys.add(turn["key"])
        self.next_index += 1
        return True


def load_turns(session_dir: Path) -> list[dict[str, Any]]:
    """Whole lines only: a line cut off by a crash is ignored (its turn was not complete)."""
    path = session_dir / "turns.jsonl"
    turns = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                turns.append(json.loads(line))
            except ValueError:
                continue
    return turns


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
