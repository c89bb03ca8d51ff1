"""Each expectation of a turn, checked against what was stored of it: pure functions, no I/O.

A check has a name (the expectation, as the user wrote it), whether it held (None: not run, e.g. an
LLM judge offline; never counted as passing), what was found, and a number where there is one
(latency, WER) so Weave can chart it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from common.speech import word_error_rate
from services.commands.evals.scenario import ToolExpectation, UserTurn


@dataclass
class Check:
    name: str
    passed: bool | None
    detail: str
    value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Interruption:
    """What the barge-in of a turn did to the reply before it."""

    turn: dict[str, Any] | None  # the interrupted turn as stored
    played_ms_at_flush: float | None  # the player's own figure when it was told to stop
    asr_of_played: str | None  # the recogniser's words for the audio as played


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def wer(reference: str, hypothesis: str) -> float:
    edits, count = word_error_rate(_words(reference), _words(hypothesis))
    return edits / max(count, 1)


def _arguments(tool: dict[str, Any]) -> dict[str, Any]:
    raw = tool.get("arguments")
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _tool_check(expected: ToolExpectation, tools: list[dict[str, Any]]) -> Check:
    name = f"tool {expected.name}" + (f" {json.dumps(expected.arguments, sort_keys=True)}" if expected.arguments
                                      else "")
    called = [t for t in tools if t.get("name") == expected.name]
    if not called:
        made = ", ".join(str(t.get("name")) for t in tools) or "none"
        return Check(name, False, f"not called (calls made: {made})")
    for tool in called:
        arguments = _arguments(tool)
        if all(arguments.get(k) == v for k, v in expected.arguments.items()):
            if expected.ok and tool.get("error"):
                return Check(name, False, f"called, but it failed: {tool['error']}")
            return Check(name, True, f"called with {json.dumps(arguments, sort_keys=True)}")
    seen = "; ".join(json.dumps(_arguments(t), sort_keys=True) for t in called)
    return Check(name, False, f"called with other arguments: {seen}")


def check_turn(turn: UserTurn, stored: dict[str, Any] | None, interruption: Interruption | None = None,
               judge=None, user_turns: int | None = None) -> list[Check]:
    """Every expectation of `turn` against its stored record (None: no turn was heard for it);
    `user_turns`: how many turns the server made of the turn's speech."""
    if turn.wait_s is not None:
        return _quiet_checks(turn, stored)
    if stored is None:
        missing = Check("turn heard", False, "the server heard no turn for this speech (no transcript, no reply)")
        # what it did to the reply spoken over is known all the same
        return [missing, *(_not_interrupted_checks(interruption) if turn.expect.not_interrupted else [])]
    expect = turn.expect
    heard = stored["assistant"].get("transcript_heard") or ""
    tools = stored.get("tools") or []
    checks = [Check("turn heard", True, f"user: {stored['user'].get('transcript')!r}")]
    if expect.user_turns is not None:
        checks.append(Check(f"heard as {expect.user_turns} turn{'s' if expect.user_turns > 1 else ''}",
                            user_turns == expect.user_turns, f"the server made {user_turns} turn(s) of it; the "
                            f"last: {stored['user'].get('transcript')!r}", user_turns))
    for text in expect.reply_contains:
        checks.append(Check(f"reply contains {text!r}", text.lower() in heard.lower(), f"heard: {heard!r}"))
    for text in expect.reply_not_contains:
        checks.append(Check(f"reply does not contain {text!r}", text.lower() not in heard.lower(), f"heard: {heard!r}"))
    if expect.reply_matches is not None:
        found = re.search(expect.reply_matches, heard, re.IGNORECASE)
        checks.append(Check(f"reply matches /{expect.reply_matches}/", found is not None, f"heard: {heard!r}"))
    for expected in expect.tool:
        checks.append(_tool_check(expected, tools))
    if expect.no_tool:
        names = ", ".join(str(t.get("name")) for t in tools)
        checks.append(Check("no tool", not tools, f"called: {names}" if tools else "no call made"))
    if expect.transcript_wer is not None and turn.expected_words is not None:
        said = stored["user"].get("transcript") or ""
        error = wer(turn.expected_words, said)
        checks.append(Check(f"transcript within WER {expect.transcript_wer:g}", error <= expect.transcript_wer,
                            f"WER {error:.2f}: {said!r} for {turn.expected_words!r}", round(error, 3)))
    if expect.latency_ms is not None:
        latency = (stored.get("timing") or {}).get("speech_end_to_first_played_ms")
        checks.append(Check(f"reply within {expect.latency_ms:g} ms", latency is not None
                            and latency <= expect.latency_ms,
                            f"{latency:.0f} ms speech end -> first reply sample played" if latency is not None
                            else "no reply was played", latency))
    if turn.barge_in_ms is not None and turn.expect.not_interrupted:
        checks += _not_interrupted_checks(interruption)
    elif turn.barge_in_ms is not None:
        checks += _barge_in_checks(turn, interruption)
    if expect.judge is not None:
        checks.append(judge(expect.judge, stored) if judge is not None else
                      Check(f"judge: {expect.judge}", None, "not run: no judge model (offline)"))
    return checks


def _quiet_checks(turn: UserTurn, stored: dict[str, Any] | None) -> list[Check]:
    """A `wait_s` turn: what the assistant said into the quiet (an idle prompt), if it was to say anything."""
    expect = turn.expect
    said = (stored or {}).get("assistant", {}).get("transcript_heard") or ""
    checks = []
    if expect.idle_prompt:
        asked = [e for e in (stored or {}).get("events") or [] if e.get("kind") == "idle_prompt"]
        detail = f"after {turn.wait_s:g} s of quiet: {said!r}" if stored else \
            f"nothing was said in {turn.wait_s:g} s of quiet"
        checks.append(Check("idle prompt", bool(asked) and bool(said), detail))
    for text in expect.reply_contains:
        checks.append(Check(f"reply contains {text!r}", text.lower() in said.lower(), f"heard: {said!r}"))
    for text in expect.reply_not_contains:
        checks.append(Check(f"reply does not contain {text!r}", text.lower() not in said.lower(), f"heard: {said!r}"))
    if not checks:  # a pause and nothing asked of it: it held if nothing was said
        checks.append(Check("quiet", stored is None, f"the assistant said {said!r}" if stored else "nothing was said"))
    return checks


PLAYED_OUT_MS = 60.0  # a reply played to within this of its end was heard to its end


def _not_interrupted_checks(interruption: Interruption | None) -> list[Check]:
    """Speech over the reply before this turn (a backchannel) left it going: not cut, weighed and resumed
    (the gateway's decision, in the trace), and played to its end."""
    spoken_over = interruption.turn if interruption is not None else None
    if spoken_over is None:
        return [Check("reply not interrupted", False, "no reply before this turn was stored")]
    assistant = spoken_over["assistant"]
    played, generated = assistant.get("played_ms") or 0.0, assistant.get("generated_ms") or 0.0
    decisions = [e.get("decision") for e in spoken_over.get("events") or [] if e.get("kind") == "interruption"]
    return [Check("reply not interrupted", not assistant.get("barge_in") and interruption.played_ms_at_flush is None,
                  f"cut at {played:.0f} of {generated:.0f} ms" if assistant.get("barge_in") else "not cut"),
            Check("reply resumed", "resumed" in decisions and "interrupted" not in decisions,
                  f"the gateway's decisions on it: {', '.join(map(str, decisions)) or 'none'}"),
            Check("reply played to its end", played >= generated - PLAYED_OUT_MS,
                  f"played {played:.0f} of {generated:.0f} ms", round(generated - played, 1))]


def _barge_in_checks(turn: UserTurn, interruption: Interruption | None) -> list[Check]:
    cut = interruption.turn if interruption is not None else None
    if cut is None or not cut["assistant"].get("barge_in"):
        return [Check("reply interrupted", False, "the reply before this turn was not cut (it had ended, or the "
                                                  "barge-in was not heard)")]
    assistant = cut["assistant"]
    checks = [Check("reply interrupted", True, f"cut at {assistant['played_ms']:.0f} of "
                                               f"{assistant['generated_ms']:.0f} ms")]
    played = interruption.played_ms_at_flush
    tolerance = turn.expect.truncation_tolerance_ms
    if played is None:
        checks.append(Check("truncated where played", False, "the player never reported a flush for that reply"))
    else:
        off = abs(assistant["played_ms"] - played)
        checks.append(Check(f"truncated where played (within {tolerance:g} ms)", off <= tolerance,
                            f"truncated at {assistant['played_ms']:.0f} ms, the player had played {played:.0f} ms",
                            round(off, 1)))
    kept, generated = assistant.get("transcript_heard") or "", assistant.get("transcript_generated") or ""
    is_prefix = generated.startswith(kept) and len(kept) < len(generated)
    if interruption.asr_of_played is None:
        # nothing to hear it against: not run, unless the kept transcript is already not a prefix
        checks.append(Check("kept transcript is what was heard", None if is_prefix else False,
                            "no audio as played to hear"))
    else:
        error = wer(kept, interruption.asr_of_played) if kept else (0.0 if not interruption.asr_of_played else 1.0)
        checks.append(Check(f"kept transcript is what was heard (WER {turn.expect.heard_wer:g})",
                            is_prefix and error <= turn.expect.heard_wer,
                            f"kept {kept!r} of {generated!r}; the played audio says {interruption.asr_of_played!r}",
                            round(error, 3)))
    return checks
