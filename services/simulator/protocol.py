"""Session configuration and event shapes for both Realtime protocols (GA and beta).

Client events are validated with the openai SDK's own client-event unions; the session is kept in
one protocol-neutral form and rendered as the GA nested object or the beta flat one.
"""

from __future__ import annotations

import secrets
import typing
from dataclasses import dataclass, field
from typing import Any

from common.realtime_types import ClientEventError, Protocol, validate_client_event  # noqa: F401 - re-exported

SIMULATOR_MODEL_PREFIX = "voicebus-simulator/"
SIMULATOR_NAME = "voicebus-simulator (local, not OpenAI)"
BETA_FALLBACK_MODEL = "gpt-4o-realtime-preview"
PCM_RATE = 24_000
# the session's audio formats, as the simulator names them -> (GA format object, beta name), as OpenAI's:
# audio/pcm is 24 kHz s16le, audio/pcmu and audio/pcma are G.711 at 8 kHz (the beta's g711_ulaw/g711_alaw)
AUDIO_FORMATS: dict[str, tuple[dict[str, Any], str]] = {
    "pcm16": ({"type": "audio/pcm", "rate": PCM_RATE}, "pcm16"),
    "pcmu": ({"type": "audio/pcmu"}, "g711_ulaw"),
    "pcma": ({"type": "audio/pcma"}, "g711_alaw"),
}
_FROM_GA = {"audio/pcm": "pcm16", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}
_FROM_BETA = {beta: name for name, (_, beta) in AUDIO_FORMATS.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass
class VadConfig:
    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    eagerness: str = "auto"  # semantic_vad only


@dataclass
class SessionConfig:
    model: str
    instructions: str = ""
    voice: str = "alloy"
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    transcription_model: str | None = None
    vad: VadConfig | None = field(default_factory=VadConfig)
    tools: list[dict[str, Any]] = field(default_factory=list)  # function tools
    mcp: list[dict[str, Any]] = field(default_factory=list)  # server-side MCP tools (GA), as the client gave them
    tool_choice: str = "auto"
    id: str = field(default_factory=lambda: new_id("sess_voicebus_sim"))
    # the rest of the session, as the client set it: echoed back; max_output_tokens caps replies (a word a
    # token), include logprobs adds them to transcripts; the others change nothing the simulator makes
    noise_reduction: dict[str, Any] | None = None
    speed: float = 1.0
    include: list[str] = field(default_factory=list)
    truncation: Any = None
    prompt: dict[str, Any] | None = None
    max_output_tokens: int | str = "inf"
    input_format: str = "pcm16"  # a key of AUDIO_FORMATS
    output_format: str = "pcm16"


def _vad_from(raw: dict[str, Any] | None, current: VadConfig | None) -> VadConfig | None:
    if raw is None:
        return None
    base = current or VadConfig()
    vad = VadConfig(type=raw.get("type", base.type),
                    threshold=raw.get("threshold", base.threshold),
                    prefix_padding_ms=raw.get("prefix_padding_ms", base.prefix_padding_ms),
                    silence_duration_ms=raw.get("silence_duration_ms", base.silence_duration_ms),
                    create_response=raw.get("create_response", base.create_response),
                    interrupt_response=raw.get("interrupt_response", base.interrupt_response),
                    eagerness=raw.get("eagerness", base.eagerness) or "auto")
    if vad.type not in ("server_vad", "semantic_vad"):
        raise ClientEventError(f"Invalid turn_detection type {vad.type!r}: server_vad or semantic_vad",
                               "session.turn_detection.type")
    if vad.eagerness not in ("auto", "low", "medium", "high"):
        raise ClientEventError(f"Invalid eagerness {vad.eagerness!r}: auto, low, medium or high",
                               "session.turn_detection.eagerness")
    if vad.threshold is None:
        vad.threshold = base.threshold
    if not 0.0 <= float(vad.threshold) <= 1.0:
        raise ClientEventError("threshold must be between 0 and 1", "session.turn_detection.threshold")
    return vad


def apply_session_update(config: SessionConfig, session: dict[str, Any], protocol: Protocol) -> None:
    """Apply a validated `session.update` payload; semantic problems raise ClientEventError."""
    if "instructions" in session:
        config.instructions = session["instructions"] or ""
    if "tools" in session:
        mcp = [dict(t) for t in session["tools"] or [] if t.get("type") == "mcp"] if protocol == "ga" else []
        labels = [t.get("server_label") for t in mcp]
        if len(set(labels)) != len(labels):
            raise ClientEventError("Each MCP tool needs a server_label of its own.", "session.tools")
        if any(not t.get("server_url") for t in mcp):
            raise ClientEventError("The simulator reaches MCP servers by server_url only (no connector_id, "
                                   "no tunnel_id).", "session.tools")
        config.tools = [dict(t) for t in session["tools"] or [] if t.get("type") == "function"]
        config.mcp = mcp
    if isinstance(session.get("tool_choice"), str):
        config.tool_choice = session["tool_choice"]
    if protocol == "ga":
        if session.get("type") not in (None, "realtime"):
            raise ClientEventError("the simulator only serves session.type 'realtime'", "session.type")
        if "output_modalities" in session:
            config.output_modalities = list(session["output_modalities"])
        audio = session.get("audio") or {}
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        for direction, fmt in (("input", audio_in.get("format")), ("output", audio_out.get("format"))):
            if not fmt:
                continue
            name = _FROM_GA.get(fmt.get("type"))
            if name is None or (name == "pcm16" and fmt.get("rate", PCM_RATE) != PCM_RATE):
                raise ClientEventError("Invalid audio format: audio/pcm (24000 Hz), audio/pcmu or audio/pcma",
                                       f"session.audio.{direction}.format")
            setattr(config, f"{direction}_format", name)
        if "voice" in audio_out:
            config.voice = audio_out["voice"]
        if "transcription" in audio_in:
            config.transcription_model = (audio_in["transcription"] or {}).get("model")
        if "turn_detection" in audio_in:
            config.vad = _vad_from(audio_in["turn_detection"], config.vad)
        if "noise_reduction" in audio_in:
            config.noise_reduction = audio_in["noise_reduction"]
        if audio_out.get("speed") is not None:
            config.speed = float(audio_out["speed"])
        for key in ("include", "truncation", "prompt", "max_output_tokens"):
            if key in session:
                setattr(config, key, session[key] if session[key] is not None else getattr(SessionConfig, key, None))
        if config.include is None:
            config.include = []
    else:
        if "modalities" in session:
            config.output_modalities = [m for m in session["modalities"] if m == "audio"] or ["text"]
        for key in ("input_audio_format", "output_audio_format"):
            if key in session:
                if session[key] not in _FROM_BETA:
                    raise ClientEventError("Invalid audio format: pcm16, g711_ulaw or g711_alaw", f"session.{key}")
                setattr(config, key.replace("_audio", ""), _FROM_BETA[session[key]])
        if "voice" in session:
            config.voice = session["voice"]
        if "input_audio_transcription" in session:
            config.transcription_model = (session["input_audio_transcription"] or {}).get("model")
        if "turn_detection" in session:
            config.vad = _vad_from(session["turn_detection"], config.vad)
        if "input_audio_noise_reduction" in session:
            config.noise_reduction = session["input_audio_noise_reduction"]
        if session.get("speed") is not None:
            config.speed = float(session["speed"])
        if "max_response_output_tokens" in session:
            config.max_output_tokens = session["max_response_output_tokens"] or "inf"


def _vad_dict(vad: VadConfig | None) -> dict[str, Any] | None:
    if vad is None:
        return None
    if vad.type == "semantic_vad":
        return {"type": vad.type, "eagerness": vad.eagerness, "create_response": vad.create_response,
                "interrupt_response": vad.interrupt_response}
    return {"type": vad.type, "threshold": vad.threshold, "prefix_padding_ms": vad.prefix_padding_ms,
            "silence_duration_ms": vad.silence_duration_ms, "create_response": vad.create_response,
            "interrupt_response": vad.interrupt_response}


def _beta_model(requested: str) -> str:
    from openai.types.beta.realtime.session import Session

    known = typing.get_args(typing.get_args(Session.model_fields["model"].annotation)[0])
    return requested if requested in known else BETA_FALLBACK_MODEL


def render_session(config: SessionConfig, protocol: Protocol) -> dict[str, Any]:
    """The session object for session.created/updated. Its model says this is the simulator."""
    model = SIMULATOR_MODEL_PREFIX + config.model
    transcription = {"model": config.transcription_model} if config.transcription_model else None
    if protocol == "ga":
        return {"type": "realtime", "object": "realtime.session", "id": config.id, "model": model,
                "instructions": config.instructions, "output_modalities": config.output_modalities,
                "audio": {"input": {"format": AUDIO_FORMATS[config.input_format][0], "transcription": transcription,
                                    "turn_detection": _vad_dict(config.vad), "noise_reduction": config.noise_reduction},
                          "output": {"format": AUDIO_FORMATS[config.output_format][0], "voice": config.voice,
                                     "speed": config.speed}},
                "tools": [*config.tools, *config.mcp], "tool_choice": config.tool_choice,
                "include": config.include or None,
                "truncation": config.truncation or "auto", "prompt": config.prompt,
                "max_output_tokens": config.max_output_tokens}
    modalities = ["audio", "text"] if "audio" in config.output_modalities else ["text"]
    # the beta Session type allows only known model names, so there the simulator says who it is
    # in an extra `server` field (and in its id and logs)
    return {"id": config.id, "object": "realtime.session", "model": _beta_model(config.model),
            "server": SIMULATOR_NAME, "modalities": modalities,
            "instructions": config.instructions, "voice": config.voice,
            "input_audio_format": AUDIO_FORMATS[config.input_format][1],
            "output_audio_format": AUDIO_FORMATS[config.output_format][1], "input_audio_transcription": transcription,
            "turn_detection": _vad_dict(config.vad), "tools": config.tools, "tool_choice": config.tool_choice,
            "input_audio_noise_reduction": config.noise_reduction, "speed": config.speed,
            "max_response_output_tokens": config.max_output_tokens}


def user_item(item_id: str, transcript: str | None, protocol: Protocol, text: str | None = None) -> dict[str, Any]:
    content = ({"type": "input_text", "text": text} if text is not None
               else {"type": "input_audio", "transcript": transcript})
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [content]}


def assistant_item(item_id: str, transcript: str | None, status: str, protocol: Protocol,
                   audio: bool = True) -> dict[str, Any]:
    if audio:
        kind = "output_audio" if protocol == "ga" else "audio"
        content = [{"type": kind, "transcript": transcript}] if transcript is not None else []
    else:
        kind = "output_text" if protocol == "ga" else "text"
        content = [{"type": kind, "text": transcript}] if transcript is not None else []
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status, "name": name,
            "call_id": call_id, "arguments": arguments}


def error_payload(message: str, *, code: str = "invalid_value", param: str | None = None,
                  event_id: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
