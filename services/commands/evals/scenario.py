"""Scenario files: a small YAML of conversations, each a list of user turns with what to expect.

    voice: slt                      # flite voice for `say` turns (default)
    scenarios:
      - name: time in tokyo
        settings: {false_interruptions: true}   # the gateway's, for this conversation alone
        turns:
          - say: what time is it in tokyo
            expect:
              tool: {name: get_current_time, arguments: {timezone: Asia/Tokyo}}
              reply_matches: "It is \\d+ \\d+ in Tokyo"
              transcript_wer: 0.34
              latency_ms: 6000
          - say: stop please
            barge_in_ms: 800        # spoken 800 ms into the previous reply: it must be cut where it was heard

A turn speaks `say` (flite), a `wav`, or the user's audio of a stored conversation (`session` +
`turn`); over the phone (`voicebus eval --phone`) it may press keys instead (`dtmf: "1#"`), and a
`barge_in_ms` then presses them that far into the reply. Errors name the file and line; everything
is checked before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.speech import FLITE_VOICES
from services.stages.gateway.session import ConversationSettings

MAX_SCENARIO_FILE_BYTES = 1024 * 1024  # scenario files are hand-written: a megabyte is far past any


class ScenarioError(ValueError):
    """A scenario file that cannot run: one message with the file and line."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a scenario never needs one, and nested aliases expand without bound
    (a "billion laughs" file took 31 s to a MemoryError). Refused at the first alias, with its line."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in scenario files",
                                              event.start_mark)
        return super().compose_node(parent, index)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | dict) else value


class ToolExpectation(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict, description="a subset of the call's arguments")
    ok: bool = Field(True, description="the tool returned an output, not an error")


class Expect(_Strict):
    reply_contains: list[str] = Field(default_factory=list)
    reply_not_contains: list[str] = Field(default_factory=list)
    reply_matches: str | None = None
    tool: list[ToolExpectation] = Field(default_factory=list)
    no_tool: bool = False
    transcript: str | None = Field(None, description="what the user said (default: the turn's `say`)")
    transcript_wer: float | None = Field(None, ge=0)
    latency_ms: float | None = Field(None, gt=0, description="speech end -> first reply sample played, at most")
    truncation_tolerance_ms: float = Field(60.0, ge=0, description="barge-in: |cut - played| at most")
    heard_wer: float = Field(0.5, ge=0, description="barge-in: kept transcript vs the played audio, at most")
    user_turns: int | None = Field(None, ge=1, description="how many turns the server made of this speech "
                                   "(1: heard whole; more: it ended the turn early, split it)")
    idle_prompt: bool = Field(False, description="a `wait_s` turn: the assistant asked whether anyone was there")
    not_interrupted: bool = Field(False, description="barge-in: the reply spoken over goes on (a backchannel, "
                                  "with settings: {false_interruptions: true}): not cut, played to its end")
    judge: str | None = Field(None, description="a rubric for an LLM judge (online only)")

    _list = field_validator("reply_contains", "reply_not_contains", "tool", mode="before")(_as_list)

    @field_validator("reply_matches")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _tools_or_none(self) -> Expect:
        if self.no_tool and self.tool:
            raise ValueError("no_tool and tool together cannot both hold")
        return self


class UserTurn(_Strict):
    say: str | list[str | float] | None = Field(None, description="words, or a list of words and pauses (seconds): "
                                                 "[\"i would like a pizza and\", 3, \"a salad please\"]")
    voice: str | None = None
    wav: str | None = None
    session: str | None = None
    turn: int | None = Field(None, ge=1)
    capture: str | None = Field(None, description="a `voicebus capture` file: its user audio is spoken")
    wait_s: float | None = Field(None, gt=0, le=120, description="say nothing this long (an idle prompt may come)")
    dtmf: str | None = Field(None, pattern=r"^[0-9*#A-D]{1,32}$", description="over the phone: keys to press, "
                             "e.g. \"1#\" (told to the model as the caller's turn)")
    topic: str = Field("audio.user", description="with capture: the audio topic to take")
    from_s: float = Field(0.0, ge=0, description="with capture: where the turn starts in that audio")
    to_s: float | None = Field(None, gt=0, description="with capture: where it ends (default: the end)")
    barge_in_ms: int | None = Field(None, ge=0, description="speak this long after the previous reply started "
                                    "(or after `barge_in_after`)")
    barge_in_after: str | None = Field(None, description="a bus topic, e.g. rt.response.output_audio_transcript"
                                       ".delta: barge_in_ms counts from its first message after the last turn")
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _one_source(self) -> UserTurn:
        sources = [name for name in ("say", "wav", "session", "capture", "dtmf", "wait_s")
                   if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError("a turn speaks exactly one of say, wav, session+turn or capture, presses dtmf, or "
                             f"waits (wait_s) (got {sources or 'none'})")
        if isinstance(self.say, list) and not any(isinstance(part, str) for part in self.say):
            raise ValueError("say as a list needs words (strings) beside its pauses (seconds)")
        if isinstance(self.say, list) and any(not isinstance(part, str) and not 0 < part <= 30 for part in self.say):
            raise ValueError("a pause in say is a number of seconds, more than 0 and at most 30")
        if self.wait_s is not None and self.barge_in_ms is not None:
            raise ValueError("a wait_s turn says nothing: it cannot barge in")
        if self.expect.idle_prompt and self.wait_s is None:
            raise ValueError("idle_prompt is what a quiet turn gets: give wait_s")
        if self.to_s is not None and self.to_s <= self.from_s:
            raise ValueError(f"to_s ({self.to_s}) must come after from_s ({self.from_s})")
        if self.barge_in_after is not None and self.barge_in_ms is None:
            self.barge_in_ms = 0
        if (self.session is None) != (self.turn is None):
            raise ValueError("session and turn go together")
        if self.voice is not None and self.voice not in FLITE_VOICES and self.voice not in FLITE_VOICES.values():
            raise ValueError(f"unknown voice {self.voice!r}")
        return self

    @property
    def expected_words(self) -> str | None:
        """What the user's transcript should say (None: nothing to check it against, e.g. keys pressed)."""
        if self.expect.transcript is not None:
            return self.expect.transcript
        if isinstance(self.say, list):
            return " ".join(part for part in self.say if isinstance(part, str))
        return self.say

    def speech_parts(self) -> list[tuple[str, str | float]]:
        """A `say` turn as ("say", words) and ("silence", seconds) parts."""
        parts = self.say if isinstance(self.say, list) else [self.say or ""]
        return [("say", part) if isinstance(part, str) else ("silence", float(part)) for part in parts]


class Scenario(_Strict):
    name: str
    settings: ConversationSettings | None = Field(None, description="the gateway's settings for this conversation "
                                                  "(turn detection, eagerness, false interruptions, idle prompts)")
    turns: list[UserTurn] = Field(min_length=1)

    @model_validator(mode="after")
    def _barge_in_needs_a_reply(self) -> Scenario:
        if self.turns[0].barge_in_ms is not None:  # barge_in_after sets it too
            raise ValueError("the first turn has no reply to barge in on")
        for index, turn in enumerate(self.turns, 1):
            if turn.expect.not_interrupted and turn.barge_in_ms is None:
                raise ValueError(f"turn {index}: not_interrupted is about a reply spoken over: give barge_in_ms")
        return self


class ScenarioFile(_Strict):
    voice: str = "slt"
    scenarios: list[Scenario] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ScenarioFile:
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario names must differ: {sorted({n for n in names if names.count(n) > 1})}")
        return self


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc` (pydantic's error path), or of its nearest parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def load_scenarios(path: Path) -> ScenarioFile:
    """Parse and validate; a ScenarioError says `file:line: where: what` for the first problem."""
    try:
        if path.stat().st_size > MAX_SCENARIO_FILE_BYTES:
            raise ScenarioError(f"{path}: {path.stat().st_size} bytes; a scenario file is at most "
                                f"{MAX_SCENARIO_FILE_BYTES} (is it the right file?)")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read ({exc})") from exc
    try:
        root = yaml.compose(text, Loader=_NoAliasLoader)
        raw = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader, aliases refused
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ScenarioError(f"{path}{line}: not valid YAML: {exc.problem or exc.context}") from exc
    if isinstance(raw, dict) and "scenarios" not in raw and "turns" in raw:
        raw = {"scenarios": [raw]}  # a file of one scenario
        root = yaml.MappingNode("tag:yaml.org,2002:map", [(yaml.ScalarNode("", "scenarios"),
                                                         yaml.SequenceNode("", [root], root.start_mark))],
                                root.start_mark) if root is not None else None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}:1: expected a mapping with `scenarios:` (a list), got {type(raw).__name__}")
    try:
        parsed = ScenarioFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        where = ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in loc).replace(".[", "[") or "file"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ScenarioError(f"{path}:{_line_of(root, loc) or 1}: {where}: {message}{more}") from exc
    return parsed


def resolve_audio(turn: UserTurn, scenario_file: Path, sessions_root: Path, staging: Path) -> Path | None:
    """The WAV a `wav`, `session` or `capture` turn speaks (relative paths: beside the scenario file);
    None for a `say` turn. A capture's audio is cut and written into `staging`."""
    if turn.capture is not None:
        from common.wavio import write_wav
        from services.devtools.inspect_capture import capture_audio

        capture = Path(turn.capture) if Path(turn.capture).is_absolute() else scenario_file.parent / turn.capture
        try:
            pcm, rate, channels, _filled, _changed = capture_audio(capture, turn.topic)
        except (ValueError, OSError) as exc:
            raise ScenarioError(f"{scenario_file}: capture {capture}: {exc}") from exc
        frame = 2 * channels
        start = int(turn.from_s * rate) * frame
        end = int(turn.to_s * rate) * frame if turn.to_s is not None else len(pcm)
        if start >= len(pcm):
            raise ScenarioError(f"{scenario_file}: capture {capture}: from_s {turn.from_s} is past its "
                                f"{len(pcm) / frame / rate:.1f} s of {turn.topic}")
        out = staging / f"capture-{capture.stem}-{turn.from_s:g}-{turn.to_s or 'end'}.wav"
        return write_wav(out, pcm[start:end], rate, channels)
    if turn.wav is not None:
        wav = Path(turn.wav)
        return wav if wav.is_absolute() else scenario_file.parent / wav
    if turn.session is not None:
        from services.stages.logger.store import load_turns

        for stored in load_turns(sessions_root / turn.session):
            if stored.get("turn") == turn.turn and "user" in stored.get("audio_files", {}):
                return sessions_root / turn.session / stored["audio_files"]["user"]
        raise ScenarioError(f"{scenario_file}: session {turn.session!r} in {sessions_root} has no turn {turn.turn} "
                            "with user audio")
    return None
