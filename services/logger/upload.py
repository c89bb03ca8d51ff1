"""`voicebus upload`: replay stored sessions through the real weave client, exactly once.

One root call per session (`voicebus.session`) and one child call per turn (`voicebus.turn`) with
the user's audio and the assistant's audio as played as `weave.Audio` (WAV), transcripts, usage,
cost and timings. A session is marked uploaded only after its calls are read back from the trace
server; the call ids are written down before flushing, so an upload cut short is checked on the
next run instead of being sent twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import click
import requests

from services.logger.store import _atomic_write, load_json, load_turns

REACHABILITY_TIMEOUT_S = 3.0
log = logging.getLogger("voicebus.upload")


class UploadError(RuntimeError):
    pass


def trace_server_url() -> str:
    from weave.trace import env

    return env.weave_trace_server_url().rstrip("/")


def reachable() -> tuple[bool, str]:
    url = trace_server_url()
    try:
        response = requests.get(f"{url}/server_info", timeout=REACHABILITY_TIMEOUT_S)
        return response.ok, f"{url} answered {response.status_code}"
    except requests.RequestException as exc:
        return False, f"{url} unreachable ({type(exc).__name__})"


def pending_sessions(root: Path, wanted: list[str]) -> list[Path]:
    dirs = [root / name for name in wanted] if wanted else sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for path in dirs:
        if not (path / "meta.json").exists():
            raise UploadError(f"{path}: not a voicebus session directory")
        state = load_json(path / "upload.json") or {}
        if not state.get("confirmed"):
            out.append(path)
    return out


def _audio(path: Path):
    import weave

    return weave.Audio.from_path(str(path)) if path.exists() and path.stat().st_size > 44 else None


def _confirmed(client, call_ids: list[str]) -> bool:
    query = {"project_id": client.project_id, "filter": {"call_ids": call_ids}}
    found = {call.id for call in client.server.calls_query_stream(query)}
    return set(call_ids) <= found


def upload_session(client, session_dir: Path, progress) -> dict[str, Any]:
    meta = load_json(session_dir / "meta.json") or {}
    turns = load_turns(session_dir)
    state_path = session_dir / "upload.json"
    state = load_json(state_path) or {}
    # an earlier run flushed but did not confirm: if it is all there now, do not send it again
    if state.get("call_ids") and _confirmed(client, state["call_ids"]):
        state["confirmed"] = True
        _atomic_write(state_path, json.dumps(state, indent=1))
        return {"session": meta.get("session"), "turns": 0, "already_there": True}
    call_ids = _trace_say(turns[0], session_dir) if meta.get("kind") == "say" else \
        _trace_conversation(client, meta, turns, session_dir, progress)
    flush_and_confirm(client, state_path, call_ids, session_dir.name)
    return {"session": meta.get("session"), "turns": len(turns), "already_there": False}


def flush_and_confirm(client, state_path: Path, call_ids: list[str], name: str, before_flush=None) -> None:
    """Write the call ids down, flush, read them back; only then mark `state_path` confirmed.

    An upload cut short after the ids are written is checked on the next run, not sent again.
    `before_flush` runs between (an Evaluation's summary, which ends its open call)."""
    _atomic_write(state_path, json.dumps({"call_ids": call_ids, "confirmed": False}, indent=1))
    if before_flush is not None:
        before_flush()
    client.flush()
    if not _confirmed(client, call_ids):
        raise UploadError(f"{name}: the trace server does not have all {len(call_ids)} calls yet; "
                          "it stays pending and will be checked on the next upload")
    _atomic_write(state_path, json.dumps({"call_ids": call_ids, "confirmed": True, "at_ns": time.time_ns()},
                                         indent=1))


def _trace_say(turn: dict[str, Any], session_dir: Path) -> list[str]:
    """The notebook's first job as a Weave op: prompt in; transcript and the audio (as audio) out."""
    import weave

    audio_path = session_dir / turn["audio_files"]["answer"]

    @weave.op(name="voicebus.say")
    def voicebus_say(prompt: str, system: str | None, model: str, voice: str) -> dict[str, Any]:
        return {"transcript": turn["transcript"], "audio": weave.Audio.from_path(str(audio_path)),
                "usage": turn["usage"]}

    _, call = voicebus_say.call(turn["prompt"], turn["system"], turn["model"], turn["voice"])
    return [call.id]


def _trace_conversation(client, meta: dict[str, Any], turns: list[dict[str, Any]], session_dir: Path,
                        progress) -> list[str]:
    session_inputs = {k: meta.get(k) for k in ("session", "model", "protocol", "server_session_id", "started_ns")}
    root = client.create_call("voicebus.session", inputs=session_inputs)
    call_ids = [root.id]
    events = [json.loads(line) for line in (session_dir / "events.jsonl").read_text().splitlines()
              if line.strip()] if (session_dir / "events.jsonl").exists() else []
    totals = {"turns": len(turns), "cost_usd": round(sum(t.get("cost_usd", 0) for t in turns), 6),
              "barge_ins": sum(1 for t in turns if t["assistant"]["barge_in"]),
              "errors": sum(1 for e in events if e.get("kind") in ("error", "unknown") and not e.get("benign")),
              "tool_calls": sum(len(t.get("tools", [])) for t in turns),
              "reconnects": sum(1 for e in events if e.get("kind") == "disconnected"),
              "dropped": sum(e.get("count", 0) for e in events if e.get("kind") == "dropped")}
    for turn in turns:
        files = {k: session_dir / v for k, v in turn.get("audio_files", {}).items()}
        call = client.create_call("voicebus.turn", parent=root, inputs={
            "turn": turn["turn"], "user_transcript": turn["user"]["transcript"],
            "user_audio": _audio(files.get("user", Path("-"))), "user": turn["user"]})
        for tool in turn.get("tools", []):  # each function call the model made in this turn
            tool_call = client.create_call("voicebus.tool", parent=call, inputs={
                "name": tool.get("name"), "arguments": tool.get("arguments"), "call_id": tool.get("call_id"),
                "source": tool.get("source")})
            client.finish_call(tool_call, output={"output": tool.get("output"), "error": tool.get("error"),
                                                  "duration_ms": tool.get("tool_ms"),
                                                  "round_trip_ms": tool.get("round_trip_ms")},
                               exception=RuntimeError(tool["error"]) if tool.get("error") else None)
            call_ids.append(tool_call.id)
        client.finish_call(call, output={
            "assistant_transcript": turn["assistant"]["transcript_heard"],
            "assistant_audio": _audio(files.get("assistant-played", Path("-"))),
            "assistant_audio_generated": _audio(files.get("assistant-generated", Path("-"))),
            "assistant": turn["assistant"], "usage": turn["usage"], "cost_usd": turn["cost_usd"],
            "timing": turn["timing"], "events": turn["events"]})
        call_ids.append(call.id)
        progress(turn)
    client.finish_call(root, output={**totals, "events": events, "ended_ns": meta.get("ended_ns")})
    return call_ids


def run_upload(root: Path, names: list[str], project: str, evals: bool = False) -> int:
    """Upload what is pending under `root`: sessions, or eval runs (`voicebus eval`) with `evals`."""
    what = "eval run" if evals else "session"
    if not root.exists():
        raise click.ClickException(f"no {what}s stored under {root}")
    if evals:
        from services.evals.upload import pending_runs, upload_eval_run

        todo, upload_one = pending_runs(root, names), upload_eval_run
    else:
        todo, upload_one = pending_sessions(root, names), upload_session
    if not todo:
        click.echo(f"nothing to upload: every stored {what} is already confirmed on the trace server")
        return 0
    if not os.environ.get("WANDB_API_KEY"):
        raise click.ClickException(f"WANDB_API_KEY is not set: nothing can be uploaded ({what}s stay in "
                                   f"{root}; weave is never asked to prompt for a login)")
    ok, why = reachable()
    if not ok:
        raise click.ClickException(f"W&B is not reachable: {why}; {len(todo)} {what}(s) stay stored for later")
    os.environ.setdefault("WANDB_SILENT", "true")
    # weave reports its own sessions and errors to Sentry unless told not to: nothing of a conversation's
    # trace goes anywhere but the trace server (set WANDB_ERROR_REPORTING=true to allow it)
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    import weave

    entity = os.environ.get("WANDB_ENTITY")
    client = weave.init(f"{entity}/{project}" if entity else project)
    total_mb = sum(f.stat().st_size for d in todo for f in d.rglob("*.wav")) / 1e6
    click.echo(f"uploading {len(todo)} {what}(s), {total_mb:.1f} MB of audio, to {trace_server_url()}")
    failures = 0
    for index, item_dir in enumerate(todo, 1):
        def progress(turn: dict[str, Any], index: int = index, name: str = item_dir.name) -> None:
            click.echo(f"  [{index}/{len(todo)}] {name} {'' if evals else 'turn '}{turn['turn']}")

        try:
            result = upload_one(client, item_dir, progress)
        except UploadError as exc:
            failures += 1
            click.echo(f"  {exc}", err=True)
            continue
        note = "already on the server" if result["already_there"] else \
            f"{result['turns']} {'scenario run' if evals else 'turn'}(s)"
        click.echo(f"  [{index}/{len(todo)}] {item_dir.name}: confirmed ({note})")
    client.finish()
    return 1 if failures else 0
