"""`voicebus logger`: build each conversation from the bus and store it durably, turn by turn."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.envelope import Message
from common.log import kv
from common.stage import SESSION_END, Stage
from services.stages.logger.conversation import ConversationBuilder
from services.stages.logger.store import SessionStore

log = logging.getLogger("voicebus.logger")
STORE_RETRY_S = 5.0
# heartbeat counters whose rise is written into the record, with the turn it happened in
LAUNCHER_EVENTS = {"launcher.restart": "stage_restarted", "launcher.finished": "stage_finished",
                   "launcher.fatal": "stage_cannot_start"}
WATCHED_COUNTERS = {"dropped": ("dropped", "gaps"),
                    "playback_glitch": ("underruns", "late_callbacks", "output_underflows")}


class LoggerStage(Stage):
    name = "logger"
    subscriptions = ["audio.user", "audio.assistant", "rt.", "player.", "health.", "tool.call", "launcher.", "phone."]
    tick_interval_s = 0.5
    batch_interval_s = 0.2  # nothing here is on the latency path: wake 5 times a second, not 100

    def __init__(self, root: Path, prices: dict[str, float] | None = None, auto_upload: bool = True,
                 project: str = "voicebus", write_reports: bool = True) -> None:
        super().__init__()
        self.root, self.auto_upload, self.project = root, auto_upload, project
        self.write_reports = write_reports  # report.html into each session's directory as it closes
        self.builder = ConversationBuilder(prices)
        self.store: SessionStore | None = None
        self.noted = 0
        self.last_counts: dict[tuple[str, str], int] = {}
        self.turns_stored = 0
        self.store_errors = 0
        self._retry_open_at = 0.0
        self.prices = prices
        self.ended: set[str] = set()  # sessions closed: a late message of theirs never reopens one
        self.facts_written: dict[str, Any] = {}
        self.live_upload: subprocess.Popen | None = None  # this session's `voicebus upload --follow`

    def counters(self) -> dict[str, Any]:
        return {"turns_stored": self.turns_stored, "open_turns": len(self.builder.turns),
                "store_errors": self.store_errors, "session_dir": str(self.store.dir) if self.store else ""}

    def handle(self, message: Message) -> None:
        if message.header.session in self.ended and not message.topic.startswith("health."):
            return
        if self.store is None and message.header.session and not message.topic.startswith("health.") \
                and time.monotonic() >= self._retry_open_at:
            try:
                self._open(message.header.session)
            except OSError as exc:  # unwritable or full store: keep listening, say so, retry later
                self.store_errors += 1
                self._retry_open_at = time.monotonic() + STORE_RETRY_S
                log.error(kv("store_unavailable", root=self.root, error=repr(exc.strerror or str(exc)),
                             retry_in_s=STORE_RETRY_S))
        if message.topic.startswith("health."):
            self._watch_counters(message)
        elif message.topic in LAUNCHER_EVENTS:  # a stage restarted mid-conversation belongs in its record
            self.builder.note({"kind": LAUNCHER_EVENTS[message.topic], **{k: message.data.get(k) for k in
                               ("stage", "reason", "restarts") if k in message.data}, "t_ns": message.header.t_ns})
        self.builder.handle(message, time.monotonic())
        self._flush_events()
        if self.store is not None and self.builder.session_facts != self.facts_written:
            self._write_facts()

    def _write_facts(self) -> None:
        """Model, protocol, server session as soon as they are known: a report of a live session has them."""
        assert self.store is not None
        try:
            self.store.write_meta(**self.builder.session_facts)
            self.facts_written = dict(self.builder.session_facts)
        except OSError as exc:
            self.store_errors += 1
            log.error(kv("store_failed", what="meta", error=repr(exc.strerror)))

    def on_session(self, topic: str, session: str, previous: str) -> None:
        """The conversation is over (its caller hung up): store what it has, close it, upload it."""
        if topic == SESSION_END and session not in self.ended:
            self._close_session()
            self.ended.add(session)
            self.builder = ConversationBuilder(self.prices)
            self.noted, self.facts_written, self.store = 0, {}, None
            log.info(kv("session_closed", session=session))

    def _open(self, session: str) -> None:
        self.store = SessionStore(self.root, session)
        resumed = self.store.next_index > 1
        self.store.write_meta(started_ns=self.store.meta.get("started_ns", time.time_ns()), ended_ns=None)
        log.info(kv("session_store", dir=self.store.dir, resumed=resumed, turns_already=self.store.next_index - 1))
        if self.auto_upload and os.environ.get("WANDB_API_KEY"):
            self.live_upload = self._spawn_upload("--follow", "--owner-pid", str(os.getpid()))

    def _watch_counters(self, message: Message) -> None:
        """Drops, gaps and playback glitches a stage reports, as events where they happened.

        The first beat of a stage is its baseline; a restarted stage counts from zero again.
        """
        stage = message.topic.removeprefix("health.")
        for kind, keys in WATCHED_COUNTERS.items():
            total = sum(int(message.data.get(key, 0) or 0) for key in keys)
            before = self.last_counts.get((stage, kind), total)
            self.last_counts[(stage, kind)] = total
            if total > before:
                self.builder.note({"kind": kind, "stage": stage, "count": total - before,
                                   **{key: message.data.get(key) for key in keys if key in message.data},
                                   "t_ns": message.header.t_ns})

    def _flush_events(self) -> None:
        if self.store is None:
            return
        for record in self.builder.session_events[self.noted:]:
            try:
                self.store.event(record)
            except OSError as exc:
                self.store_errors += 1
                log.error(kv("store_failed", what="event", error=repr(exc.strerror)))
        self.noted = len(self.builder.session_events)

    def tick(self) -> None:
        self._store(self.builder.tick(time.monotonic()))

    def _store(self, finished: list) -> None:
        if not finished:
            return
        if self.store is None:
            self.store_errors += len(finished)
            log.error(kv("turns_not_stored", count=len(finished), reason="session store unavailable"))
            return
        for record, audio in finished:
            try:
                if self.store.write_turn(record, audio):
                    self.turns_stored += 1
                    log.info(kv("turn_stored", turn=record["turn"], user=repr(record["user"]["transcript"]),
                                assistant=repr(record["assistant"]["transcript_heard"]),
                                latency_ms=record["timing"]["speech_end_to_first_played_ms"]))
            except OSError as exc:  # full or read-only disk: say so, keep the pipeline running
                self.store_errors += 1
                log.error(kv("store_failed", what="turn", error=repr(exc.strerror), dir=self.store.dir))

    def stop(self) -> None:
        self._close_session()

    def _close_session(self) -> None:
        self._store(self.builder.tick(time.monotonic(), final=True))
        self._flush_events()
        if self.store is None:
            return
        try:
            self.store.write_meta(ended_ns=time.time_ns(), **self.builder.session_facts,
                                  turns=self.store.next_index - 1)
        except OSError as exc:
            log.error(kv("store_failed", what="meta", error=repr(exc.strerror)))
        if self.write_reports:
            self._spawn_report()
        live = self.live_upload
        self.live_upload = None
        if self.auto_upload and os.environ.get("WANDB_API_KEY") and (live is None or live.poll() is not None):
            self._spawn_upload()  # the live uploader gave up (W&B unreachable) or never ran: one more try

    def _spawn_report(self) -> None:
        """report.html beside the session, for the caller's page and for reading later; written by a process
        of its own (matplotlib's ~30 MB and its seconds of CPU never in this stage)."""
        assert self.store is not None
        try:
            subprocess.Popen([sys.executable, "-m", "services.cli", "report", str(self.store.dir), "-o",
                              str(self.store.dir / "report.html")], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.error(kv("report_not_started", session=self.store.session, error=repr(exc.strerror)))

    def _spawn_upload(self, *extra: str) -> subprocess.Popen:
        """Upload in a separate process: the weave client's threads, retries and hangs never touch this stage.

        Live (`--follow`): started with the session, it sends each turn as it is stored and the session
        call once the session has ended here; else one upload of whatever is pending."""
        assert self.store is not None
        log_file = open(self.store.dir / "upload.log", "ab")  # noqa: SIM115 - handed to the child
        child = subprocess.Popen([sys.executable, "-m", "services.cli", "upload", self.store.session, "--root",
                                  str(self.root), "--project", self.project, *extra], stdin=subprocess.DEVNULL,
                                 stdout=log_file, stderr=log_file, start_new_session=True)
        log_file.close()
        log.info(kv("upload_started", session=self.store.session, live=bool(extra), log=self.store.dir / "upload.log"))
        return child
