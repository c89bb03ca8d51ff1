"""`voicebus eval --from-session`: a stored conversation becomes a scenario file (a regression test).

Each user turn's audio, as the logger stored it, is copied beside the scenario file and spoken
again as it was; the expectations are what happened: the same transcript (within a WER), the
same tool calls with the same arguments (or none), the reply's longer words. Edit them freely.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from services.stages.logger.store import load_turns

TRANSCRIPT_WER = 0.34
REPLY_WORDS = 3


def reply_words(reply: str) -> list[str]:
    """The reply's longest alphabetic words (no digits: times and counts change between runs)."""
    words = sorted({w for w in re.findall(r"[A-Za-z']+", reply) if len(w) >= 4}, key=lambda w: (-len(w), w))
    return words[:REPLY_WORDS]


def _expectations(turn: dict[str, Any]) -> dict[str, Any]:
    expect: dict[str, Any] = {}
    heard = turn["assistant"].get("transcript_heard") or ""
    if reply_words(heard):
        expect["reply_contains"] = reply_words(heard)
    tools = turn.get("tools") or []
    if tools:
        expect["tool"] = []
        for tool in tools:
            arguments = tool.get("arguments") or {}
            if isinstance(arguments, str):  # as the model sent them; the store keeps them parsed (a dict)
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    arguments = {}
            expect["tool"].append({"name": tool.get("name"), "arguments": arguments if isinstance(arguments, dict)
                                   else {}, "ok": not tool.get("error")})
    else:
        expect["no_tool"] = True
    if turn["user"].get("transcript"):
        expect["transcript"] = turn["user"]["transcript"]
        expect["transcript_wer"] = TRANSCRIPT_WER
    return expect


def scenario_from_session(session_dir: Path, out: Path) -> Path:
    """Write `out` (YAML) and the user WAVs beside it; the path written."""
    turns = sorted(load_turns(session_dir), key=lambda t: t["turn"])
    spoken = [t for t in turns if (session_dir / t.get("audio_files", {}).get("user", "-")).is_file()
              and t["user"].get("audio_ms")]
    if not spoken:
        raise ValueError(f"{session_dir}: no stored turn with user audio (is it a voicebus session?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    scenario_turns = []
    for turn in spoken:
        wav = out.parent / f"{out.stem}-turn-{turn['turn']}.wav"
        shutil.copyfile(session_dir / turn["audio_files"]["user"], wav)
        scenario_turns.append({"wav": wav.name, "expect": _expectations(turn)})
    header = (f"# made by `voicebus eval --from-session {session_dir.name}`: each turn speaks the user's audio as "
              "stored;\n# the expectations are what happened then (edit them: reply words, tools, transcript).\n")
    body = yaml.safe_dump({"scenarios": [{"name": f"replay of {session_dir.name}", "turns": scenario_turns}]},
                          sort_keys=False, allow_unicode=True)
    out.write_text(header + body)
    return out
