"""An eval run as a Weave Evaluation, through the real weave client's `EvaluationLogger`, exactly once.

One prediction per scenario run: the user's audio and the reply as heard (`weave.Audio`, each turn),
what was transcribed and called; every check a score (True/False), each turn's latency a score.
As with sessions, the run is marked uploaded only once its calls are read back from the server; the
call ids are written down before flushing, so an upload cut short is checked, not sent again.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.stages.logger.store import _atomic_write, load_json
from services.weave_upload import UploadError, at, audio, confirmed, flush_and_confirm

RUN_FILE = "run.json"


def pending_runs(root: Path, wanted: list[str]) -> list[Path]:
    dirs = [root / name for name in wanted] if wanted else sorted(p for p in root.iterdir()
                                                                  if p.is_dir() and not p.name.startswith("."))
    out = []
    for path in dirs:
        if not (path / RUN_FILE).exists():
            raise UploadError(f"{path}: not a voicebus eval run (no {RUN_FILE})")
        if not (load_json(path / "upload.json") or {}).get("confirmed"):
            out.append(path)
    return out


def score_key(turn: int, check_name: str) -> str:
    """A score's name: the turn and the check, as an identifier (Weave makes a scorer of each)."""
    return f"turn{turn}_" + (re.sub(r"[^a-z0-9]+", "_", check_name.lower()).strip("_")[:48] or "check")


@contextlib.contextmanager
def timed_as(client, started_ns: int | None, ended_ns: int | None) -> Iterator[None]:
    """The calls weave's `EvaluationLogger` makes inside are dated as the run happened, not now: it takes
    no times of its own, so the client's create/finish are given them for the duration."""
    create, finish = client.create_call, client.finish_call

    def create_call(*args, started_at=None, **kwargs):
        return create(*args, started_at=started_at or at(started_ns), **kwargs)

    def finish_call(*args, ended_at=None, **kwargs):
        return finish(*args, ended_at=ended_at or at(ended_ns), **kwargs)

    client.create_call, client.finish_call = create_call, finish_call
    try:
        yield
    finally:
        del client.create_call, client.finish_call  # the class's own methods again


def upload_eval_run(client, run_dir: Path, progress) -> dict[str, Any]:
    import weave

    result = load_json(run_dir / RUN_FILE) or {}
    state_path = run_dir / "upload.json"
    state = load_json(state_path) or {}
    if state.get("call_ids") and confirmed(client, state["call_ids"]):
        _atomic_write(state_path, json.dumps({**state, "confirmed": True}, indent=1))
        return {"session": result.get("run"), "turns": 0, "already_there": True}
    rows = [{"file": Path(s["file"]).name, "scenario": s["name"], "repeat": s["repeat"],
             "turns": [t.get("say") or t.get("wav") for t in s["turns"]]} for s in result.get("scenarios", [])]
    run_window = (result.get("started_ns"), result.get("created_ns"))
    with timed_as(client, *run_window):
        evaluation = weave.EvaluationLogger(
            name=f"voicebus-eval-{result.get('run')}", model={"name": "voicebus", **{k: v for k, v in (
                result.get("settings") or {}).items() if v}, "target": result.get("target")},
            dataset=rows, eval_attributes={"run": result.get("run"), "files": result.get("files")})
    call_ids = [evaluation._evaluate_call.id]
    for row, scenario in zip(rows, result.get("scenarios", []), strict=True):
        turns = scenario["turns"]
        inputs = {**row, "session": scenario["session"],
                  "user_audio": [audio(run_dir / t["audio"]["user"]) if t["audio"].get("user") else None
                                 for t in turns]}
        output = {"turns": [{"turn": t["turn"], "user_transcript": t.get("user_transcript"),
                             "reply_heard": t.get("reply_heard"), "tools": t.get("tools"),
                             "latency_ms": t.get("latency_ms"),
                             "heard_audio": audio(run_dir / t["audio"]["heard"]) if t["audio"].get("heard") else None}
                            for t in turns]}
        with timed_as(client, scenario.get("started_ns"), scenario.get("ended_ns")):
            prediction = evaluation.log_prediction(inputs=inputs, output=output)
            for turn in turns:
                for check in turn["checks"]:
                    if check["passed"] is not None:
                        prediction.log_score(score_key(turn["turn"], check["name"]), bool(check["passed"]))
                if turn.get("latency_ms") is not None:
                    prediction.log_score(f"turn{turn['turn']}_latency_ms", float(turn["latency_ms"]))
            prediction.log_score("passed", bool(scenario["passed"]))
            prediction.finish()
        call_ids.append(prediction.predict_and_score_call.id)
        progress({"turn": f"{scenario['name']} #{scenario['repeat']}"})

    def summary() -> None:
        with timed_as(client, *run_window):
            evaluation.log_summary(result.get("summary") or {})

    flush_and_confirm(client, state_path, call_ids, run_dir.name, before_flush=summary)
    return {"session": result.get("run"), "turns": len(rows), "already_there": False}
