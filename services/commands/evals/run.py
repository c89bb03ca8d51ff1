"""Run scenarios through the real pipeline: one conversation (session) per scenario and repeat.

The stages are the ones `voicebus up` starts (gateway, resampler, tools, logger) with a cued mic
(`voicebus mic --cued`: silence until told to speak a WAV, so a barge-in lands N ms into a reply)
and a player that records into a WAV. Each scenario gets its own session on the same stages
(`session.begin`/`session.end`, as a new browser does): a fresh Realtime session, its own store.
What is checked is what the logger stored of each turn: the user's words, the reply as heard, the
tools called, the latency at the ear, and for a barge-in the player's own played position.

With `--phone` each scenario is a phone call instead: a fake carrier (Twilio Media Streams, μ-law
8 kHz, paced in real time) calls a phone stage whose gateway session is `audio/pcmu`; it speaks the
turns, presses the keys of `dtmf:` turns, and barges in by what it has played. The played position
is then the last mark the carrier echoed, as on a real line.

Everything goes into a staging directory that becomes the run's directory only when the run is
complete; a run that cannot start (bad file, target down, unknown tool) leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import zmq

from common.bus import Publisher, Receiver, connect_pub, connect_sub, wait_for_bus
from common.config import BusConfig, openai_target
from common.envelope import Message, Stamper
from common.speech import SpeechError, Transcriber, synthesize
from common.stage import SESSION_BEGIN, SESSION_END
from common.wavio import WavError, read_wav, write_wav
from services.commands.evals.checks import Check, Interruption, check_turn
from services.commands.evals.scenario import (
    Scenario,
    ScenarioError,
    ScenarioFile,
    UserTurn,
    load_scenarios,
    resolve_audio,
)
from services.launcher import LauncherError, ProcessSpec, Supervisor, default_zygote
from services.pipeline import EXAMPLE_TOOLS, simulator_spec
from services.stages.gateway.session import ConversationSettings
from services.stages.logger.store import load_json, load_turns
from services.stages.mic import CUE_STATE_TOPIC, CUE_TOPIC

MIC_RATE = 48_000
READY_TIMEOUT_S = 60.0
TURN_TIMEOUT_S = 60.0
STORE_TIMEOUT_S = 15.0
CUE_LEAD_NS = 20_000_000  # a cue takes effect at the next 20 ms frame
NO_REPLY_WAIT_NS = 3_000_000_000  # a turn that expects no reply: an answer that comes anyway begins within this


class EvalError(click.ClickException):
    """The run cannot go on (the pipeline did not come up, a cue was refused): exit 2, nothing stored."""

    exit_code = 2


@dataclass
class Settings:
    instructions: Path | None = None
    tool_modules: list[str] = field(default_factory=list)
    mcp_commands: list[str] = field(default_factory=list)
    repeat: int = 1
    rules: Path | None = None
    sessions_root: Path | None = None  # where `session:` turns are read from
    phone: bool = False  # each scenario a call over the fake carrier into a phone stage


@dataclass
class Planned:
    """A scenario of a file, with the WAV each turn speaks (made or found before anything starts)."""

    file: Path
    scenario: Scenario
    audio: list[Path | None]  # None: a turn that presses keys (dtmf) or stays quiet (wait_s), off the phone


@dataclass
class Observed:
    """What the bus showed of one conversation, beyond what the logger stores."""

    cues: dict[str, dict[str, int]] = field(default_factory=dict)  # cue -> {started, ended} capture ns
    played_at_flush: dict[str, float] = field(default_factory=dict)  # item_id -> player's played_ms
    timeouts: list[int] = field(default_factory=list)  # turns (1-based) that got no complete reply
    # barge-in turns (1-based) spoken with no reply to interrupt: why the timing asked for was impossible
    unbargeable: dict[int, str] = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "scenario"


# --- before anything starts ---------------------------------------------------------------------
def plan(files: list[Path], staging_audio: Path, settings: Settings) -> list[Planned]:
    """Parse every file and make or check every turn's audio; a ScenarioError for the first problem."""
    planned = []
    sessions_root = settings.sessions_root or Path("-")
    for path in files:
        parsed: ScenarioFile = load_scenarios(path)
        for scenario in parsed.scenarios:
            audio = []
            for index, turn in enumerate(scenario.turns, 1):
                where = f"{path}: scenario {scenario.name!r} turn {index}"
                if turn.dtmf is not None and not settings.phone:
                    raise ScenarioError(f"{where}: presses keys (dtmf), which only a phone line carries: run "
                                        "`voicebus eval --phone`")
                if turn.expect.not_interrupted and settings.phone:
                    raise ScenarioError(f"{where}: not_interrupted is not for a phone call yet: the fake carrier takes "
                                        "its turns by the replies it hears, and a backchannel gets none; run it "
                                        "without --phone")
                if turn.barge_in_after is not None and settings.phone:
                    raise ScenarioError(f"{where}: barge_in_after times from a bus topic; over the phone a barge-in "
                                        "is timed by what the caller has heard: use barge_in_ms")
                out = staging_audio / f"{slug(path.stem)}-{slug(scenario.name)}-{index}.wav"
                if turn.wait_s is not None and settings.phone:  # a line is never silent: it carries silence
                    audio.append(write_wav(out, bytes(int(turn.wait_s * MIC_RATE) * 2), MIC_RATE))
                    continue
                if turn.dtmf is not None or turn.wait_s is not None:
                    audio.append(None)
                    continue
                source = resolve_audio(turn, path, sessions_root, staging_audio)
                if source is None:
                    try:
                        pcm = b"".join(synthesize(str(value), turn.voice or parsed.voice, MIC_RATE) if kind == "say"
                                       else bytes(int(float(value) * MIC_RATE) * 2)
                                       for kind, value in turn.speech_parts())
                    except SpeechError as exc:
                        raise ScenarioError(f"{where}: cannot speak it: {exc}") from exc
                    source = write_wav(out, pcm, MIC_RATE)
                else:
                    try:
                        read_wav(source)
                    except (WavError, OSError) as exc:
                        raise ScenarioError(f"{where}: {exc}") from exc
                audio.append(source)
            planned.append(Planned(path, scenario, audio))
    return planned


def check_target_up() -> None:
    """The Realtime server must answer before stages are started against it."""
    target = openai_target()
    if target.is_simulator and not os.environ.get("VOICEBUS_SIM_URL"):
        return  # the eval starts its own simulator
    url = urlparse(target.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        which = "the simulator named by VOICEBUS_SIM_URL" if target.is_simulator else "the Realtime API"
        raise EvalError(f"{which} at {target.base_url} is down ({exc.strerror or exc}); nothing was run") from exc


def unknown_tools(planned: list[Planned], offered: set[str]) -> list[str]:
    named = {(p.file, p.scenario.name, index, tool.name) for p in planned
             for index, turn in enumerate(p.scenario.turns, 1) for tool in turn.expect.tool}
    return [f"{file}: scenario {name!r} turn {index} expects tool {tool!r}, which the tools stage does not offer "
            f"(it offers: {', '.join(sorted(offered)) or 'none'})"
            for file, name, index, tool in sorted(named, key=str) if tool not in offered]


# --- the pipeline -------------------------------------------------------------------------------
class Pipeline:
    """The stages of one eval run, and the eval's own sockets on their bus."""

    def __init__(self, staging: Path, settings: Settings, run_id: str, topics: set[str] | None = None) -> None:
        self.sessions_dir = staging / "sessions"
        self.run_dir = Path(tempfile.mkdtemp(prefix="vb-eval-", dir="/tmp"))
        os.chmod(self.run_dir, 0o700)
        self.cfg = BusConfig(pub=f"ipc://{self.run_dir}/pub.sock", sub=f"ipc://{self.run_dir}/sub.sock")
        quiet = ["--log-level", "WARNING"]
        env = {"VOICEBUS_LOG_LEVEL": "WARNING"}
        simulator = simulator_spec([*quiet, *(["--rules", str(settings.rules)] if settings.rules else [])], env)
        specs = [simulator] if simulator is not None else []
        modules = [a for m in settings.tool_modules or [str(EXAMPLE_TOOLS)] for a in ("--module", m)]
        mcp = [a for command in settings.mcp_commands for a in ("--mcp", command)]
        instructions = ["--instructions", settings.instructions.read_text()] if settings.instructions else []
        if settings.phone:  # the caller's line: μ-law to the server and back untouched
            # voice ash: one OpenAI has, which the simulator speaks as flite's rms, a voice the offline
            # recogniser still reads through 8 kHz (its slt, alloy's, it mostly does not)
            line = [ProcessSpec("gateway", ["gateway", "--audio-format", "pcmu", "--voice", "ash", *instructions,
                                            *quiet]),
                    ProcessSpec("phone", ["phone", "--port", "0", *quiet])]
        else:
            line = [ProcessSpec("gateway", ["gateway", *instructions, *quiet]),
                    ProcessSpec("resample", ["resample", *quiet]),
                    ProcessSpec("player", ["player", "--wav", str(staging / "played.wav"), *quiet]),
                    ProcessSpec("mic", ["mic", "--cued", "--rate", str(MIC_RATE), *quiet])]
        specs += [*line, ProcessSpec("tools", ["tools", *modules, *mcp, *quiet]),
                  ProcessSpec("logger", ["logger", "--root", str(self.sessions_dir), "--no-upload", "--no-report",
                                         *quiet])]
        self.stage_names = {spec.name for spec in specs if spec.heartbeat}
        self.supervisor = Supervisor(self.cfg, specs, f"eval-{run_id}", env, zygote=default_zygote())
        self.ctx = zmq.Context()
        self.receiver: Receiver | None = None
        self.publisher: Publisher | None = None
        self.stamper = Stamper("eval", f"eval-{run_id}")
        self.barge_topics = set(topics or ())  # what `barge_in_after` times from: noted as it passes
        self.topics = sorted({"rt.", "player.state", "health.", "phone.", CUE_STATE_TOPIC, *self.barge_topics})
        self.phone_url = ""  # the phone stage's Media Streams socket, as its heartbeat says

    def start(self) -> set[str]:
        """Start everything; the names of the tools the conversation offers."""
        try:
            self.supervisor.start()
        except (LauncherError, RuntimeError) as exc:
            raise EvalError(str(exc)) from exc
        self.receiver = Receiver(connect_sub(self.ctx, self.cfg, self.topics), "eval")
        self.publisher = Publisher(connect_pub(self.ctx, self.cfg))
        wait_for_bus(self.ctx, self.cfg, timeout_s=10, pub=self.publisher.sock, sub=self.receiver.sock)
        seen: set[str] = set()
        tools: list[str] = []  # the server's session's, as the gateway's heartbeat last said
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            message = self.recv(100)
            if message is None:
                continue
            if message.topic.startswith("health."):
                seen.add(message.topic.removeprefix("health."))
            if message.topic == "health.gateway":
                tools = list(message.data.get("session_tools") or [])
            if message.topic == "health.phone":
                self.phone_url = str(message.data.get("url") or "")
            # the tools stage always offers at least one (the example module by default)
            if tools and self.stage_names <= seen:
                # the launch session ends unused: each scenario then begins on a server session of its own
                self.send(SESSION_END, {"session": self.stamper.session, "reason": "eval: scenarios follow"})
                return set(tools)
        missing = ", ".join(sorted(self.stage_names - seen)) or "none (no Realtime session came up)"
        raise EvalError(f"the pipeline did not come up within {READY_TIMEOUT_S:.0f} s; stages not heard from: "
                        f"{missing}; run `voicebus doctor`")

    def recv(self, timeout_ms: int) -> Message | None:
        assert self.receiver is not None
        self.supervisor.poll()
        if self.supervisor.fatal is not None:
            raise EvalError(self.supervisor.fatal)
        return self.receiver.recv(timeout_ms=timeout_ms)

    def send(self, topic: str, data: dict[str, Any]) -> None:
        assert self.publisher is not None
        self.publisher.send(self.stamper.event(topic, data, time.time_ns()))

    def stop(self) -> None:
        for sock in (self.receiver, self.publisher):
            if sock is not None:
                sock.sock.close(0)
        self.ctx.term()
        self.supervisor.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)


# --- one conversation ---------------------------------------------------------------------------
class Conversation:
    """Speaks a scenario's turns into the cued mic and follows the replies on the bus."""

    def __init__(self, pipeline: Pipeline, session: str) -> None:
        self.pipeline, self.session = pipeline, session
        self.observed = Observed()
        self.items_started: dict[str, int] = {}  # assistant item -> when the player started it
        self.finished_items: set[str] = set()  # played out to the end
        self.spoken_items: set[str] = set()  # items of responses that carried audio
        self.session_ready = False  # the gateway's server session for this conversation is configured
        self.first_delta_ns: dict[str, int] = {}  # assistant item -> when its first audio arrived
        self.topic_times: dict[str, list[int]] = {}  # barge-in topics of this conversation -> sent at (ns)

    def _pump(self, timeout_ms: int = 50) -> Message | None:
        message = self.pipeline.recv(timeout_ms)
        if message is None:
            return None
        data = message.data if isinstance(message.data, dict) else {}
        if message.topic in self.pipeline.barge_topics and message.header.session == self.session:
            self.topic_times.setdefault(message.topic, []).append(message.header.t_ns)
        if message.topic == "player.state" and message.header.session == self.session:
            item = data.get("item_id")
            if item and data.get("item_started_ns"):
                self.items_started.setdefault(item, data["item_started_ns"])
            if item and data.get("flushed"):
                self.observed.played_at_flush[item] = float(data.get("played_ms", 0))
            if item and not data.get("playing") and data.get("played_ms", 0) >= data.get("received_ms", 1) - 1:
                self.finished_items.add(item)
        elif message.topic == CUE_STATE_TOPIC:
            cue = data.get("cue", "")
            if data.get("state") == "error":
                raise EvalError(f"the mic refused {cue}: {data.get('reason')}")
            self.observed.cues.setdefault(cue, {})[data.get("state", "")] = data.get("t_capture_ns", 0)
        elif message.topic == "rt.response.output_audio.delta" and message.header.session == self.session:
            self.first_delta_ns.setdefault(data.get("event", {}).get("item_id", ""), message.header.t_ns)
        elif message.topic == "rt.session.updated" and message.header.session == self.session:
            self.session_ready = True
        elif message.topic == "rt.response.done" and message.header.session == self.session:
            for item in (data.get("event", {}).get("response", {}) or {}).get("output") or []:
                if item.get("type") == "message":
                    self.spoken_items.add(item.get("id", ""))
        return message

    def _until(self, done, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return True
            self._pump()
        return done()

    def begin(self, settings: ConversationSettings | None = None) -> None:
        if settings is not None:
            self.pipeline.send("gateway.configure", {"session": self.session, "settings": settings.overrides()})
        self.pipeline.send(SESSION_BEGIN, {"session": self.session, "reason": "eval scenario"})
        if not self._until(lambda: self.session_ready, 30):
            raise EvalError(f"{self.session}: no Realtime session within 30 s of session.begin")

    def speak(self, index: int, wav: Path) -> str:
        cue = f"{self.session}/{index}"
        self.pipeline.send(CUE_TOPIC, {"cue": cue, "path": str(wav)})
        if not self._until(lambda: "started" in self.observed.cues.get(cue, {}), 10):
            raise EvalError(f"the mic did not start speaking {cue} within 10 s")
        return cue

    def stay_quiet(self, index: int, wait_s: float) -> str:
        """A `wait_s` turn: the mic goes on sending silence; its cue is the quiet's start and end."""
        cue = f"{self.session}/{index}"
        started = time.time_ns()
        self.observed.cues[cue] = {"started": started}
        self._until(lambda: False, wait_s)
        self.observed.cues[cue]["ended"] = started + int(wait_s * 1e9)
        return cue

    def wait_reply_started(self, cue: str, after_ms: int, after_topic: str | None, index: int) -> None:
        """For a barge-in (turn `index` + 1): return `after_ms` after the reply to `cue` started playing, or
        after the first `after_topic` message since `cue` started.

        The reply is one of this conversation's (its audio came in this session) that started playing
        after the whole question was spoken: never a reply the player still names from an earlier
        conversation, nor one to half a question the server's VAD split. When none comes within the
        turn timeout, the turn is spoken anyway and says why its timing was impossible."""
        if after_topic is not None:
            def seen() -> bool:
                started = self.observed.cues.get(cue, {}).get("started")
                return started is not None and any(t > started for t in self.topic_times.get(after_topic, []))

            if not self._until(seen, TURN_TIMEOUT_S):
                self.observed.unbargeable[index + 1] = f"no {after_topic} within {TURN_TIMEOUT_S:.0f} s of the " \
                                                       "question before it"
                return
            started = self.observed.cues[cue]["started"]
            origin_ns = min(t for t in self.topic_times[after_topic] if t > started)
        else:
            def replies_playing() -> list[str]:
                ended = self.observed.cues.get(cue, {}).get("ended")
                if ended is None:
                    return []
                return [item for item, at in self.items_started.items() if item in self.first_delta_ns and at > ended]

            if not self._until(lambda: bool(replies_playing()), TURN_TIMEOUT_S):
                self.observed.unbargeable[index + 1] = f"no reply to the question before it began to play within " \
                                                       f"{TURN_TIMEOUT_S:.0f} s: nothing to interrupt"
                return
            item = min(replies_playing(), key=self.items_started.__getitem__)
            origin_ns = self.items_started[item]
        due_ns = origin_ns + after_ms * 1_000_000 - CUE_LEAD_NS
        while time.time_ns() < due_ns:
            self._pump(max(1, min(50, (due_ns - time.time_ns()) // 1_000_000)))

    def wait_reply_done(self, cue: str, index: int, reply_expected: bool = True) -> None:
        """Until the reply to `cue` has been played out (a tool call's follow-up answer included). A turn
        that expects none of its own (a backchannel): until every reply begun has played out or been cut."""
        def done() -> bool:
            started = self.observed.cues.get(cue, {}).get("started", 0)
            replies = {item for item in self.spoken_items if self.first_delta_ns.get(item, 0) > started}
            over = self.finished_items | set(self.observed.played_at_flush)  # played out, or cut by a barge-in
            if not reply_expected:  # and long enough after it for an answer it should not get to begin
                ended = self.observed.cues.get(cue, {}).get("ended")
                return ended is not None and time.time_ns() - ended >= NO_REPLY_WAIT_NS \
                    and set(self.items_started) <= over and replies <= over
            if "ended" not in self.observed.cues.get(cue, {}) or not replies or not replies <= over:
                return False
            # the last reply was cut: the speech went on after the server ended a turn (it split it), and the
            # rest is answered too; unless nothing more comes (the cut was the scenario's own barge-in)
            latest = max(replies, key=lambda item: self.first_delta_ns.get(item, 0))
            ended = self.observed.cues[cue]["ended"]
            return latest in self.finished_items or (time.time_ns() - ended >= NO_REPLY_WAIT_NS
                                                     and set(self.items_started) <= over)

        if not self._until(done, TURN_TIMEOUT_S):
            self.observed.timeouts.append(index)

    def end(self, store_dir: Path, replies: int) -> None:
        self.pipeline.send(SESSION_END, {"session": self.session, "reason": "eval scenario over"})
        self.wait_stored(store_dir, replies)

    def wait_stored(self, store_dir: Path, replies: int) -> None:
        """Until the logger has closed the session and stored a turn for each reply (or a while has passed)."""
        def stored() -> bool:
            meta = load_json(store_dir / "meta.json") or {}
            return bool(meta.get("ended_ns")) and len(load_turns(store_dir)) >= replies

        self._until(stored, STORE_TIMEOUT_S)


def converse(pipeline: Pipeline, planned: Planned, session: str) -> Observed:
    conversation = Conversation(pipeline, session)
    conversation.begin(planned.scenario.settings)
    turns = planned.scenario.turns
    for index, wav in enumerate(planned.audio, 1):
        wait_s = turns[index - 1].wait_s
        cue = conversation.speak(index, wav) if wav is not None else conversation.stay_quiet(index, wait_s or 0.0)
        following = turns[index] if index < len(turns) else None
        if following is not None and following.barge_in_ms is not None:
            conversation.wait_reply_started(cue, following.barge_in_ms, following.barge_in_after, index)
        else:
            expect = turns[index - 1].expect
            reply_expected = expect.idle_prompt or bool(expect.reply_contains) if wait_s is not None \
                else not expect.not_interrupted
            conversation.wait_reply_done(cue, index, reply_expected=reply_expected)
    replies = len(conversation.spoken_items)
    conversation.end(pipeline.sessions_dir / session, replies)
    return conversation.observed


# --- one conversation over the phone ---------------------------------------------------------------
def line_pcm(wav: Path) -> bytes:
    """A turn's audio as a phone line carries it: 8 kHz mono s16le (the carrier encodes it μ-law)."""
    from common import g711
    from common.resample import float_to_pcm, resample_oneshot
    from common.speech import read_wav_mono

    samples, rate = read_wav_mono(wav)
    return float_to_pcm(resample_oneshot(samples, rate, g711.RATE))


class PhoneCall(Conversation):
    """A scenario as one phone call: the fake carrier (its own thread and 20 ms clock) speaks the turns,
    presses the keys and barges in by what it has played; the bus shows the call's session (the phone
    stage makes one per call), the played positions and the replies, as it does for the mic."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(pipeline, session="")  # known once the phone stage has taken the call
        self.call_sid = ""

    def _pump(self, timeout_ms: int = 50) -> Message | None:
        message = super()._pump(timeout_ms)
        if message is not None and message.topic == "phone.started" and message.data.get("call_sid") == self.call_sid:
            self.session = message.header.session
        return message

    def run(self, planned: Planned) -> None:
        from services.serving.call.carrier import CarrierRefused, FakeCarrier, Turn

        turns = [Turn(b"" if wav is None else line_pcm(wav), turn.barge_in_ms, turn.dtmf or "")
                 for turn, wav in zip(planned.scenario.turns, planned.audio, strict=True)]
        carrier = FakeCarrier(self.pipeline.phone_url, turns, timeout_s=TURN_TIMEOUT_S * len(turns))
        self.call_sid = carrier.result.call_sid
        if planned.scenario.settings is not None:  # for the conversation the call is about to begin
            self.pipeline.send("gateway.configure", {"settings": planned.scenario.settings.overrides()})
        outcome: dict[str, BaseException] = {}

        def call() -> None:
            try:
                asyncio.run(carrier.run())
            except (TimeoutError, CarrierRefused, OSError, ValueError) as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=call, name="fake-carrier", daemon=True)
        thread.start()
        while thread.is_alive():
            self._pump()
        error = outcome.get("error")
        if error is not None and not isinstance(error, TimeoutError):
            raise EvalError(f"the fake carrier's call to {self.pipeline.phone_url} failed: {error}")
        if not self.session:
            raise EvalError(f"the phone stage at {self.pipeline.phone_url} never took the call")
        result = carrier.result
        for index, start in enumerate(result.turn_starts_frame, 1):
            ends = result.turn_ends_frame
            self.observed.cues[f"{self.session}/{index}"] = {
                "started": result.frame_ns(start), **({"ended": result.frame_ns(ends[index - 1])}
                                                      if index <= len(ends) else {})}
        if error is not None:  # the call ran out of time: the turn it was in, and those never spoken
            self.observed.timeouts += list(range(max(1, len(result.turn_ends_frame) + 1), len(turns) + 1))
        # the phone stage ended the session at the hang-up; the logger stores it
        self.wait_stored(self.pipeline.sessions_dir / self.session, len(self.spoken_items))


def call_by_phone(pipeline: Pipeline, planned: Planned) -> tuple[str, Observed]:
    """The scenario as a phone call; the session the phone stage gave it, and what the bus showed."""
    call = PhoneCall(pipeline)
    call.run(planned)
    return call.session, call.observed


# --- matching stored turns to the scenario's turns and checking them -------------------------------
def _window(cues: list[dict[str, int]], index: int) -> tuple[int, float]:
    end = cues[index + 1].get("started", 0) if index + 1 < len(cues) else float("inf")
    return cues[index].get("started", 0), end


def user_turns_in(stored: list[dict[str, Any]], cues: list[dict[str, int]]) -> list[int]:
    """How many turns the server made of each cue's speech (more than one: it ended a turn early)."""
    out = []
    for index in range(len(cues)):
        start, end = _window(cues, index)
        out.append(sum(1 for t in stored if start <= ((t.get("timing") or {}).get("speech_end_ns") or 0) < end))
    return out


def spoken_unasked(stored: list[dict[str, Any]], cues: list[dict[str, int]], index: int) -> dict[str, Any] | None:
    """For a `wait_s` turn: the first reply nobody spoke for (an idle prompt) begun within its window."""
    start, end = _window(cues, index)
    return next((t for t in sorted(stored, key=lambda t: t["turn"]) if not (t.get("user") or {}).get("transcript")
                 and start <= (t.get("started_ns") or 0) < end), None)


def match_turns(stored: list[dict[str, Any]], cues: list[dict[str, int]]) -> list[dict[str, Any] | None]:
    """The stored turn of each spoken cue: the last one whose speech ended within that cue's window
    (from its start to the next cue's start); a turn the server split in two keeps its last part."""
    matched: list[dict[str, Any] | None] = []
    for index, cue in enumerate(cues):
        start = cue.get("started", 0)
        end = cues[index + 1].get("started", 0) if index + 1 < len(cues) else float("inf")
        inside = [t for t in stored if start <= ((t.get("timing") or {}).get("speech_end_ns") or 0) < end]
        matched.append(max(inside, key=lambda t: t["turn"]) if inside else None)
    return matched


def _asr_of_played(store_dir: Path, turn: dict[str, Any] | None, transcriber: Transcriber) -> str | None:
    path = store_dir / (turn or {}).get("audio_files", {}).get("assistant-played", "-")
    if turn is None or not path.is_file():
        return None
    played = read_wav(path)  # mono s16 at the session's rate (24 kHz; 8 kHz for a phone call)
    return transcriber.transcribe(played.pcm, played.rate)


@functools.cache
def _judge_client():
    """One openai client for every judged turn of the run (its connection pool is reused)."""
    from openai import OpenAI

    target = openai_target()
    return OpenAI(api_key=target.api_key, base_url=target.base_url)


def judge_turn(rubric: str, stored: dict[str, Any]) -> Check:
    """An LLM judge on the turn (online only): the openai SDK's chat completions, a yes/no verdict."""
    client = _judge_client()
    prompt = (f"User said: {stored['user'].get('transcript')!r}\nAssistant said (as heard): "
              f"{stored['assistant'].get('transcript_heard')!r}\nTools: {json.dumps(stored.get('tools') or [])}\n"
              f"Does the assistant's turn satisfy this rubric? {rubric}\nAnswer PASS or FAIL, then one sentence why.")
    model = os.environ.get("VOICEBUS_EVAL_JUDGE_MODEL", "gpt-4o-mini")
    try:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=80).choices[0].message.content or ""
    except Exception as exc:  # the SDK's many errors: a judge that did not answer is a failed check, not a crash
        return Check(f"judge: {rubric}", False, f"{model} did not answer: {type(exc).__name__}: {exc}")
    return Check(f"judge: {rubric}", answer.strip().upper().startswith("PASS"), f"{model}: {answer.strip()}")


def evaluate(planned: Planned, observed: Observed, store_dir: Path, transcriber: Transcriber) -> list[dict[str, Any]]:
    """One result per user turn: its checks and where its audio is."""
    stored = sorted(load_turns(store_dir), key=lambda t: t["turn"])
    cues = [observed.cues.get(f"{store_dir.name}/{i}", {}) for i in range(1, len(planned.scenario.turns) + 1)]
    matched = match_turns(stored, cues)
    counts = user_turns_in(stored, cues)
    for index, turn in enumerate(planned.scenario.turns):
        if turn.wait_s is not None:  # nothing was said: what the assistant said in the quiet is its turn
            matched[index] = spoken_unasked(stored, cues, index)
    judge = judge_turn if not openai_target().is_simulator else None
    results = []
    for index, (turn, record) in enumerate(zip(planned.scenario.turns, matched, strict=True)):
        interruption = None
        if turn.barge_in_ms is not None:
            before = matched[index - 1]
            item = (before or {}).get("assistant", {}).get("item_id", "")
            interruption = Interruption(before, observed.played_at_flush.get(item),
                                        _asr_of_played(store_dir, before, transcriber))
        checks = check_turn(turn, record, interruption, judge, user_turns=counts[index])
        if index + 1 in observed.unbargeable:
            checks.append(Check("barge-in timing", False, observed.unbargeable[index + 1]))
        if index + 1 in observed.timeouts:
            checks.append(Check("reply played out", False, f"no complete reply within {TURN_TIMEOUT_S:.0f} s"))
        results.append(turn_result(index + 1, turn, record, checks, store_dir))
    return results


def turn_result(index: int, turn: UserTurn, record: dict[str, Any] | None, checks: list[Check],
                store_dir: Path) -> dict[str, Any]:
    files = (record or {}).get("audio_files", {})
    return {
        "turn": index, "say": turn.expected_words if turn.say is not None else None,
        "dtmf": turn.dtmf, "wait_s": turn.wait_s, "wav": turn.wav or turn.capture or (
            f"{turn.session} turn {turn.turn}" if turn.session else None),
        "barge_in_ms": turn.barge_in_ms, "barge_in_after": turn.barge_in_after,
        "expect": turn.expect.model_dump(exclude_defaults=True),
        "user_transcript": (record or {}).get("user", {}).get("transcript"),
        "reply_heard": (record or {}).get("assistant", {}).get("transcript_heard"),
        "tools": [{k: t.get(k) for k in ("name", "arguments", "output", "error")} for t in (record or {}).get("tools", [])],
        "latency_ms": ((record or {}).get("timing") or {}).get("speech_end_to_first_played_ms"),
        "audio": {"user": f"sessions/{store_dir.name}/{files['user']}" if "user" in files else None,
                  "heard": f"sessions/{store_dir.name}/{files['assistant-played']}" if "assistant-played" in files
                  else None},
        "checks": [c.as_dict() for c in checks],
        "passed": all(c.passed is not False for c in checks) and any(c.passed for c in checks),
    }
