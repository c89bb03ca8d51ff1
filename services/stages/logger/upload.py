"""`voicebus upload`: stored sessions to W&B Weave through the real weave client, each turn exactly once.

Each turn goes out twice over, as Weave shows conversations in two places, both timed as it happened
(the capture clock the store kept, never the moment of the upload):
- **Threads** (the calls API): the turn is a `voicebus.turn` call in `weave.thread(<session>)`, a turn
  call of that thread, with its tool calls under it and the user's and assistant's audio as
  `weave.Audio`; all under one `voicebus.session` call spanning the conversation (its totals, events).
- **Agents** (the GenAI OTel ingest): the turn's `invoke_agent`/`chat`/`execute_tool` spans
  (services/stages/logger/agents.py), the audio as WAV `Content` referenced from the messages.

Exactly once, per turn: the call ids are minted and written to `upload.json` before anything is
sent, the calls are read back from the trace server, the spans (ids derived from the session and the
turn) are exported synchronously; only then is the turn marked. A run cut short is checked on the next
one, not sent again. `--follow` (services/stages/logger/live.py) sends each turn as it is stored; a lock keeps
a second uploader off a session that one is sending.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.stages.logger.store import _atomic_write, load_json, load_turns
from services.stages.logger.weave_setup import trace_server_url
from services.weave_upload import SessionBusy, UploadError, at, audio, confirmed

LOCK_WAIT_S = 60.0  # an upload finds a session being sent by another: wait this long for it, then skip it
STATE_VERSION = 2
log = logging.getLogger("voicebus.upload")


def _state(session_dir: Path) -> dict[str, Any]:
    state = load_json(session_dir / "upload.json") or {}
    if state.get("version") != STATE_VERSION:  # an older uploader's record: one list of ids, one flag
        state = {"version": STATE_VERSION, "legacy": state} if state else {"version": STATE_VERSION}
    state.setdefault("turns", {})
    return state


def _save(session_dir: Path, state: dict[str, Any]) -> None:
    _atomic_write(session_dir / "upload.json", json.dumps(state, indent=1))


def session_pending(session_dir: Path) -> bool:
    state = _state(session_dir)
    if state.get("legacy", {}).get("confirmed"):
        return False
    done = {key for key, entry in state["turns"].items() if entry.get("done")}
    return not state.get("confirmed") or any(t["key"] not in done for t in load_turns(session_dir))


def pending_sessions(root: Path, wanted: list[str]) -> list[Path]:
    dirs = [root / name for name in wanted] if wanted else sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for path in dirs:
        if not (path / "meta.json").exists():
            raise UploadError(f"{path}: not a voicebus session directory")
        if session_pending(path):
            out.append(path)
    return out


def _new_id() -> str:
    from weave.utils.ids import generate_id

    return generate_id()


class SessionLock:
    """An flock on `<session>/upload.lock`: one uploader per session at a time (dies with its holder).

    Held by another, it is waited for up to `wait_s` (an upload after a session's own one), then given up."""

    def __init__(self, session_dir: Path, wait_s: float = 0.0) -> None:
        self.path = session_dir / "upload.lock"
        self.file = None
        self.wait_s = wait_s

    def __enter__(self) -> SessionLock:
        self.file = open(self.path, "a+")  # noqa: SIM115 - held for the life of the lock
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                self.file.seek(0)
                holder = self.file.read().strip() or "?"
                self.file.close()
                raise SessionBusy(f"{self.path.parent.name}: being sent by another uploader (pid {holder}); "
                                  "it stays pending until that one is done") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.file is not None
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class SessionUploader:
    """Sends one stored session: its new turns now, the session call once it has ended."""

    def __init__(self, client, session_dir: Path, export_spans: Callable[[list], bool],
                 progress: Callable[[dict[str, Any]], None]) -> None:
        self.client, self.dir, self.export_spans, self.progress = client, session_dir, export_spans, progress
        self.state = _state(session_dir)

    def save(self) -> None:
        _save(self.dir, self.state)

    def root_stub(self):
        """The session call as a parent before it exists: it is sent last, under this id, once the
        conversation is over (its start and end are the conversation's)."""
        from weave.trace.call import Call

        if not self.state.get("root_id"):
            self.state["root_id"] = _new_id()
            self.save()
        root_id = self.state["root_id"]
        return Call(_op_name="voicebus.session", trace_id=root_id, project_id=self.client.project_id,
                    parent_id=None, inputs={}, id=root_id)

    def send_new_turns(self) -> int:
        """Every stored turn not yet confirmed; returns how many were sent."""
        import weave

        meta = load_json(self.dir / "meta.json") or {}
        turns = load_turns(self.dir)
        pending = [t for t in turns if not self.state["turns"].get(t["key"], {}).get("done")]
        if not pending:
            return 0
        parent = self.root_stub()
        with weave.thread(meta.get("session") or self.dir.name):
            for turn in pending:
                self._send_turn(meta, turn, parent, self._history(turn, turns))
                self.progress(turn)
        return len(pending)

    def _history(self, turn: dict[str, Any], turns: list[dict[str, Any]]) -> list:
        """The conversation before `turn` (of the stored `turns`) as the chats' context: each earlier turn's
        messages, with the audio refs its own send recorded (never published again)."""
        from services.stages.logger.agents import HISTORY_TURNS, turn_messages

        earlier = [t for t in turns if t.get("turn", 0) < turn.get("turn", 0)][-HISTORY_TURNS:]
        out = []
        for past in earlier:
            out += turn_messages(past, self.state["turns"].get(past["key"], {}).get("audio_refs") or {})
        return out

    def _send_turn(self, meta: dict[str, Any], turn: dict[str, Any], parent, history: list) -> None:
        from services.stages.logger import agents

        entry = self.state["turns"].setdefault(turn["key"], {})
        files = {k: self.dir / v for k, v in turn.get("audio_files", {}).items()}
        # the audio as Content first: one flush then carries it with the calls (published again on a retry:
        # refs written down before a flush may name objects that never reached the server; content-addressed)
        entry["audio_refs"] = {name: ref for name in (agents.USER_AUDIO, agents.PLAYED_AUDIO, agents.GENERATED_AUDIO)
                               if name in files and (ref := self._publish_wav(files[name]))}
        if not entry.get("calls_confirmed"):
            if entry.get("call_ids") and confirmed(self.client, entry["call_ids"]):
                entry["calls_confirmed"] = True  # sent by a run that was cut short before it could say so
            else:
                entry["call_ids"] = [_new_id() for _ in range(1 + len(turn.get("tools", [])))]
                self.save()  # the ids are written down before anything is sent
                self._turn_calls(turn, files, parent, entry["call_ids"])
        self.client.flush()
        if not entry.get("calls_confirmed"):
            if not confirmed(self.client, entry["call_ids"]):
                raise UploadError(f"{self.dir.name} turn {turn['turn']}: the trace server does not have "
                                  "its calls yet; it stays pending and is checked on the next upload")
            entry["calls_confirmed"] = True
        spans = agents.turn_spans(meta.get("session") or self.dir.name, meta, turn, entry["audio_refs"], history)
        entry["span_ids"] = agents.span_ids(spans)
        self.save()
        if not self.export_spans(spans):
            raise UploadError(f"{self.dir.name} turn {turn['turn']}: the trace server did not take its spans; "
                              "they stay pending (a re-send carries the same span ids)")
        entry["spans_confirmed"] = entry["done"] = True
        self.save()

    def _turn_calls(self, turn: dict[str, Any], files: dict[str, Path], parent, call_ids: list[str]) -> None:
        client = self.client
        started, ended = at(turn.get("started_ns")), at(turn.get("ended_ns"))
        call = client.create_call("voicebus.turn", parent=parent, use_stack=False, _call_id_override=call_ids[0],
                                  started_at=started, display_name=f"turn {turn['turn']}", inputs={
                                      "turn": turn["turn"], "user_transcript": turn["user"]["transcript"],
                                      "user_audio": audio(files.get("user", Path("-"))), "user": turn["user"]})
        for tool, call_id in zip(turn.get("tools", []), call_ids[1:], strict=True):
            tool_call = client.create_call("voicebus.tool", parent=call, use_stack=False, _call_id_override=call_id,
                                           started_at=at(tool.get("called_ns")) or started, inputs={
                                               "name": tool.get("name"), "arguments": tool.get("arguments"),
                                               "call_id": tool.get("call_id"), "source": tool.get("source")})
            client.finish_call(tool_call, output={"output": tool.get("output"), "error": tool.get("error"),
                                                  "duration_ms": tool.get("tool_ms"),
                                                  "round_trip_ms": tool.get("round_trip_ms")},
                               exception=RuntimeError(tool["error"]) if tool.get("error") else None,
                               ended_at=at(tool.get("answered_ns")) or ended)
        client.finish_call(call, ended_at=ended, output={
            "assistant_transcript": turn["assistant"]["transcript_heard"],
            "assistant_audio": audio(files.get("assistant-played", Path("-"))),
            "assistant_audio_generated": audio(files.get("assistant-generated", Path("-"))),
            "assistant": turn["assistant"], "usage": turn["usage"], "cost_usd": turn["cost_usd"],
            "timing": turn["timing"], "responses": turn.get("responses"), "events": turn["events"]})

    def _publish_wav(self, path: Path) -> str | None:
        """The WAV as weave `Content`, published; its `weave://` ref, as the Agents view's UriPart wants."""
        if not path.exists() or path.stat().st_size <= 44:
            return None
        import weave
        from weave.type_wrappers.Content.content import Content

        ref = weave.publish(Content.from_bytes(path.read_bytes(), mimetype="audio/wav"))
        return str(getattr(ref, "uri", ref))

    def finish_session(self) -> None:
        """The `voicebus.session` call: sent once, after the last turn, timed as the conversation was."""
        if self.state.get("confirmed"):
            return
        meta = load_json(self.dir / "meta.json") or {}
        turns = load_turns(self.dir)
        root_id = self.root_stub().id
        if not (self.state.get("root_sent") and confirmed(self.client, [root_id])):
            self.state["root_sent"] = True
            self.save()
            self._session_call(meta, turns, root_id)
            self.client.flush()
            if not confirmed(self.client, [root_id]):
                raise UploadError(f"{self.dir.name}: the trace server does not have the session call yet; "
                                  "it stays pending and is checked on the next upload")
        self.state.update(confirmed=True, at_ns=time.time_ns())
        self.save()

    def _session_call(self, meta: dict[str, Any], turns: list[dict[str, Any]], root_id: str) -> None:
        import weave

        events = [json.loads(line) for line in (self.dir / "events.jsonl").read_text().splitlines()
                  if line.strip()] if (self.dir / "events.jsonl").exists() else []
        totals = {"turns": len(turns), "cost_usd": round(sum(t.get("cost_usd", 0) for t in turns), 6),
                  "barge_ins": sum(1 for t in turns if t["assistant"]["barge_in"]),
                  "errors": sum(1 for e in events if e.get("kind") in ("error", "unknown") and not e.get("benign")),
                  "tool_calls": sum(len(t.get("tools", [])) for t in turns),
                  "reconnects": sum(1 for e in events if e.get("kind") == "disconnected"),
                  "dropped": sum(e.get("count", 0) for e in events if e.get("kind") == "dropped")}
        ends = [t.get("ended_ns") or 0 for t in turns]
        started = meta.get("started_ns") or min((t.get("started_ns") or 0 for t in turns), default=None)
        ended = meta.get("ended_ns") or max(ends, default=None)
        inputs = {k: meta.get(k) for k in ("session", "model", "protocol", "server_session_id", "started_ns")}
        with weave.thread(None):  # the session call is no turn of its thread: the turns are
            root = self.client.create_call("voicebus.session", inputs=inputs, use_stack=False,
                                           _call_id_override=root_id, started_at=at(started))
        self.client.finish_call(root, output={**totals, "events": events, "ended_ns": ended}, ended_at=at(ended))


def upload_session(client, session_dir: Path, progress, export_spans: Callable[[list], bool]) -> dict[str, Any]:
    """Everything pending of one stored session, the session call included."""
    state = _state(session_dir)
    legacy = state.get("legacy") or {}
    if legacy.get("call_ids") and confirmed(client, legacy["call_ids"]):
        _save(session_dir, {**legacy, "confirmed": True})  # an older uploader's run, cut short but complete
        return {"turns": 0, "already_there": True}
    meta = load_json(session_dir / "meta.json") or {}
    with SessionLock(session_dir, LOCK_WAIT_S):
        if not session_pending(session_dir):  # the uploader that held it sent it all
            return {"turns": 0, "already_there": True}
        if meta.get("kind") == "say":
            return _upload_say(client, session_dir, meta)
        uploader = SessionUploader(client, session_dir, export_spans, progress)
        sent = uploader.send_new_turns()
        uploader.finish_session()
    return {"turns": sent, "already_there": False}


def _upload_say(client, session_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The notebook's first job as the Weave op `voicebus.say`, timed as the answer streamed."""
    import weave

    state = _state(session_dir)
    [turn] = load_turns(session_dir)
    audio_path = session_dir / turn["audio_files"]["answer"]
    call_id = state.get("say_call_id")
    if not (call_id and confirmed(client, [call_id])):
        call_id = state["say_call_id"] = _new_id()
        _save(session_dir, state)

        @weave.op(name="voicebus.say")
        def voicebus_say(prompt: str, system: str | None, model: str, voice: str) -> dict[str, Any]:
            raise NotImplementedError("recorded, not run: the answer was streamed when `voicebus say` ran")

        call = client.create_call(voicebus_say, inputs={"prompt": turn["prompt"], "system": turn["system"],
                                                        "model": turn["model"], "voice": turn["voice"]},
                                  use_stack=False, _call_id_override=call_id, started_at=at(meta.get("started_ns")))
        client.finish_call(call, output={"transcript": turn["transcript"], "audio": weave.Audio.from_path(
            str(audio_path)), "usage": turn["usage"]}, op=voicebus_say, ended_at=at(meta.get("ended_ns")))
        client.flush()
        if not confirmed(client, [call_id]):
            raise UploadError(f"{session_dir.name}: the trace server does not have the call yet; it stays pending")
    state["turns"][turn["key"]] = {"call_ids": [call_id], "calls_confirmed": True, "done": True}
    _save(session_dir, {**state, "confirmed": True, "at_ns": time.time_ns()})
    return {"turns": 1, "already_there": False}


def span_exporter(client) -> Callable[[list], bool]:
    from services.stages.logger.agents import exporter

    return exporter(trace_server_url(), client.project_id, os.environ["WANDB_API_KEY"])
