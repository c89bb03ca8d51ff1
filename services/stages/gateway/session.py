"""What the gateway sends: `session.update` from config, and the conversation replayed after a reconnect.

Built as the openai SDK's client-event param types (TypedDicts), GA or beta shaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PCM = {"type": "audio/pcm", "rate": 24000}
# --audio-format -> (GA format object, beta name, the bus's fmt, sample rate): G.711 as a phone line carries it
AUDIO_FORMATS: dict[str, tuple[dict[str, Any], str, str, int]] = {
    "pcm16": (PCM, "pcm16", "s16le", 24_000),
    "pcmu": ({"type": "audio/pcmu"}, "g711_ulaw", "pcmu", 8000),
    "pcma": ({"type": "audio/pcma"}, "g711_alaw", "pcma", 8000),
}


@dataclass
class SessionSettings:
    model: str = "gpt-realtime"
    instructions: str = "You are a helpful voice assistant. Keep answers short."
    voice: str = "alloy"
    # both ways: pcm16 (24 kHz s16le), or pcmu/pcma (8 kHz G.711: a phone call's own codes, passed through)
    audio_format: str = "pcm16"
    transcription_model: str | None = "whisper-1"
    vad_type: str = "server_vad"
    vad_threshold: float = 0.3  # the notebook's values
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 600
    # the server cancels its own response when the user starts speaking; the gateway then only
    # flushes and truncates (a client response.cancel would get response_cancel_not_active)
    interrupt_response: bool = True
    eagerness: str = "auto"  # semantic_vad: low waits longest for an unfinished phrase (8 s), high least (2 s)
    # the rest of the GA session (None: the server's default); beta has no counterpart for some (left out there)
    noise_reduction: str | None = None  # near_field (a headset) or far_field (a laptop, a room)
    transcription_logprobs: bool = False  # include item.input_audio_transcription.logprobs
    truncation_retention: float | None = None  # when the context is full, keep this share of it
    prompt: dict[str, Any] | None = None  # a stored prompt: {id, version?, variables?}
    max_output_tokens: int | None = None
    speed: float | None = None  # of the assistant's voice, 0.25-1.5
    idle_timeout_s: float | None = None  # quiet this long: ask whether they are still there (idle.py)
    idle_prompt: str = "Are you still there?"
    idle_prompts: int = 2  # unanswered asks before the call ends
    # speech over a reply pauses it, and what was said decides (interruptions.py); the server then neither
    # cancels nor answers on its own: create_response and interrupt_response are off, the gateway decides
    false_interruptions: bool = False
    min_interruption_s: float = 0.0  # with false_interruptions: speech shorter than this never cuts a reply
    # said as each conversation's line goes live (its first user audio); not interruptible: the caller's
    # audio is not forwarded while it plays (a disclaimer heard whole)
    greeting: str | None = None
    greeting_interruptible: bool = True
    min_interruption_words: int = 0  # ... nor fewer words than this
    # keys a caller pressed (phone.dtmf) are told to the model as a user turn (keypad.py); None: not told
    keys_wait_s: float | None = 1.5
    # remote MCP servers the Realtime server itself lists and calls (GA): (server_label, server_url); it asks
    # before each call, and the gateway approves the tools named in mcp_approve ("*": all), refuses the rest
    server_mcp: tuple[tuple[str, str], ...] = ()
    mcp_approve: frozenset[str] = frozenset()


class ConversationSettings(BaseModel):
    """What one conversation may set apart from the gateway's command line (`gateway.configure` on the bus
    before its `session.begin`: an eval scenario's `settings:`), and what a session file sets
    (`gateway --session-file`): turn-taking, the voice and what is said, never the audio format or the
    server."""

    model_config = ConfigDict(extra="forbid")
    instructions: str | None = Field(None, max_length=20_000)
    voice: str | None = Field(None, max_length=40)
    speed: float | None = Field(None, ge=0.25, le=1.5)
    noise_reduction: Literal["near_field", "far_field"] | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=4096)
    interrupt_response: bool | None = None
    vad_type: Literal["server_vad", "semantic_vad"] | None = None
    eagerness: Literal["auto", "low", "medium", "high"] | None = None
    vad_threshold: float | None = Field(None, ge=0, le=1)
    vad_prefix_padding_ms: int | None = Field(None, ge=0, le=5000)
    vad_silence_duration_ms: int | None = Field(None, ge=0, le=10_000)
    false_interruptions: bool | None = None
    greeting: str | None = Field(None, max_length=1000)
    greeting_interruptible: bool | None = None
    min_interruption_s: float | None = Field(None, ge=0, le=10)
    min_interruption_words: int | None = Field(None, ge=0, le=20)
    idle_timeout_s: float | None = Field(None, ge=1)
    idle_prompt: str | None = Field(None, max_length=500)
    idle_prompts: int | None = Field(None, ge=0, le=10)

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def load_session_file(path: Path) -> dict[str, Any]:
    """A session file's settings (YAML or JSON, the fields of ConversationSettings); ValueError says what is wrong."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings (e.g. `vad_type: semantic_vad`)")
    try:
        return ConversationSettings.model_validate(raw).overrides()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(k) for k in first["loc"]) or "file"
        raise ValueError(f"{path}: {where}: {first['msg']}") from exc


def function_tools(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tools.available entries as the API's function tools."""
    return [{"type": "function", "name": t["name"], "description": t.get("description", ""),
             "parameters": t.get("parameters") or {"type": "object", "properties": {}}} for t in listing]


def mcp_tools(settings: SessionSettings) -> list[dict[str, Any]]:
    """The remote MCP servers as GA session tools: the server asks before every call (the gateway's policy answers)."""
    return [{"type": "mcp", "server_label": label, "server_url": url, "require_approval": "always"}
            for label, url in settings.server_mcp]


def session_update(settings: SessionSettings, protocol: str, tools: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    vad: dict[str, Any] = {"type": settings.vad_type, "create_response": not settings.false_interruptions,
                           "interrupt_response": settings.interrupt_response and not settings.false_interruptions}
    if settings.vad_type == "semantic_vad":  # the server decides when the phrase is over: no energy knobs
        vad["eagerness"] = settings.eagerness
    else:
        vad.update(threshold=settings.vad_threshold, prefix_padding_ms=settings.vad_prefix_padding_ms,
                   silence_duration_ms=settings.vad_silence_duration_ms)
    transcription = {"model": settings.transcription_model} if settings.transcription_model else None
    if protocol == "ga":
        from openai.types.realtime import SessionUpdateEventParam

        audio_format = AUDIO_FORMATS[settings.audio_format][0]
        event: SessionUpdateEventParam = {"type": "session.update", "session": {
            "type": "realtime", "instructions": settings.instructions, "output_modalities": ["audio"],
            "audio": {"input": {"format": audio_format, "transcription": transcription, "turn_detection": vad},
                      "output": {"format": audio_format, "voice": settings.voice}},
            "tools": [*function_tools(tools or []), *mcp_tools(settings)], "tool_choice": "auto"}}
        session = event["session"]
        if settings.noise_reduction:
            session["audio"]["input"]["noise_reduction"] = {"type": settings.noise_reduction}
        if settings.speed is not None:
            session["audio"]["output"]["speed"] = settings.speed
        if settings.transcription_logprobs:
            session["include"] = ["item.input_audio_transcription.logprobs"]
        if settings.truncation_retention is not None:
            session["truncation"] = {"type": "retention_ratio", "retention_ratio": settings.truncation_retention}
        if settings.prompt:
            session["prompt"] = settings.prompt
        if settings.max_output_tokens is not None:
            session["max_output_tokens"] = settings.max_output_tokens
        return dict(event)
    from openai.types.beta.realtime import SessionUpdateEventParam as BetaSessionUpdate

    beta: BetaSessionUpdate = {"type": "session.update", "session": {
        "modalities": ["audio", "text"], "instructions": settings.instructions, "voice": settings.voice,
        "input_audio_format": AUDIO_FORMATS[settings.audio_format][1],
        "output_audio_format": AUDIO_FORMATS[settings.audio_format][1], "input_audio_transcription": transcription,
        "turn_detection": vad, "tools": function_tools(tools or []), "tool_choice": "auto"}}
    if settings.noise_reduction:
        beta["session"]["input_audio_noise_reduction"] = {"type": settings.noise_reduction}
    if settings.speed is not None:
        beta["session"]["speed"] = settings.speed
    if settings.max_output_tokens is not None:
        beta["session"]["max_response_output_tokens"] = settings.max_output_tokens
    return dict(beta)


def replay_item(role: str, text: str, protocol: str) -> dict[str, Any]:
    """A conversation.item.create restoring one turn as text after a reconnect (a new server session)."""
    if role == "user":
        content = [{"type": "input_text", "text": text}]
    else:
        content = [{"type": "output_text" if protocol == "ga" else "text", "text": text}]
    return {"type": "conversation.item.create", "item": {"type": "message", "role": role, "content": content}}
