"""A stored turn as the OpenTelemetry GenAI spans Weave's Agents view reads, timed as it happened.

Weave's Conversation SDK (`weave.conversation`) and its OpenAI Realtime integration both make these
spans; we build them with the SDK's own attribute builders and message types, so the attribute names
and JSON shapes are Weave's, and add what only voicebus knows (the audio as heard, the barge-in cut,
latency at the ear) as `voicebus.*` attributes. One trace per turn, as the SDK's `log_turn` makes:

    invoke_agent voicebus          the turn: user speech start -> last sample played; user and
    ├── chat gpt-realtime          assistant messages with their audio (WAV Content, UriPart)
    ├── execute_tool get_time      one per server response (usage, status) and one per function call
    └── chat gpt-realtime          (arguments, output or error), each with its own start and end

Why not the SDK's `log_turn` itself: it emits through OTel's process-wide provider and a batching
processor that never says whether the trace server took the spans. Here the spans are built as
`ReadableSpan`s with ids derived from the session and the turn, and exported synchronously: the
server's 2xx is the confirmation, and a re-send after a failure carries the same ids (idempotent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from weave.conversation.conversation_otel import (
    execute_tool_attributes,
    invoke_agent_attributes,
    llm_attributes,
)
from weave.conversation.types import Message, TextPart, ToolCallPart, ToolCallResponsePart, UriPart, Usage

AGENT_NAME = "voicebus"
PROVIDER = "openai"
EXPORT_TIMEOUT_S = 30.0
SCOPE = InstrumentationScope("voicebus.logger")
HISTORY_TURNS = 50  # a chat's context holds at most this many earlier turns (the attribute's size stays bounded)

# audio file name in the store -> how the spans refer to it
USER_AUDIO, PLAYED_AUDIO, GENERATED_AUDIO = "user", "assistant-played", "assistant-generated"


def _version() -> str:
    try:
        return metadata.version("voicebus")
    except metadata.PackageNotFoundError:
        return "0"


def _resource() -> Resource:
    from weave.version import VERSION

    return Resource.create({"service.name": AGENT_NAME, "service.version": _version(), "wandb.sdk.name": "weave",
                            "wandb.sdk.version": VERSION, "wandb.sdk.language": "python"})


def _provenance() -> dict[str, Any]:
    """What weave's integrations stamp on each span (`integration.*`, `weave.*` client info), as ours."""
    from weave.utils.capture_info import get_capture_info

    return {"integration.name": AGENT_NAME, "integration.version": _version(),
            "integration.meta.package_name": "voicebus", "integration.meta.package_version": _version(),
            **{f"weave.{k}": v for k, v in get_capture_info().items()}}


def _id(bits: int, *parts: str) -> int:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return int.from_bytes(digest[: bits // 8], "big") or 1


def _usage(usage: dict[str, Any] | None) -> Usage | None:
    if not usage:
        return None
    cached = (usage.get("input_token_details") or {}).get("cached_tokens") or 0
    return Usage(input_tokens=usage.get("input_tokens") or 0, output_tokens=usage.get("output_tokens") or 0,
                 total_tokens=usage.get("total_tokens"), cache_read_input_tokens=cached)


def _audio_part(uri: str | None) -> list[UriPart]:
    return [UriPart(modality="audio", mime_type="audio/wav", uri=uri)] if uri else []


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    """OTel takes scalars and lists of one scalar type: drop None, encode dicts as JSON."""
    out = {}
    for key, value in attrs.items():
        if value is None:
            continue
        out[key] = json.dumps(value, default=str) if isinstance(value, dict) else value
    return out


def turn_messages(turn: dict[str, Any], audio_refs: dict[str, str]) -> tuple[Message, Message]:
    """The user's message and the assistant's as heard: what the server's conversation holds of a turn
    once it is over (a barge-in truncates the assistant's item to what was played)."""
    user, assistant = turn["user"], turn["assistant"]
    user_message = Message(role="user", parts=[
        *([TextPart(content=user["transcript"])] if user.get("transcript") else []),
        *_audio_part(audio_refs.get(USER_AUDIO))])
    heard = Message(role="assistant", parts=[
        *([TextPart(content=assistant["transcript_heard"])] if assistant.get("transcript_heard") else []),
        *_audio_part(audio_refs.get(PLAYED_AUDIO))])
    return user_message, heard


def turn_spans(session: str, meta: dict[str, Any], turn: dict[str, Any], audio_refs: dict[str, str],
               history: list[Message] | None = None) -> list[ReadableSpan]:
    """The spans of one stored turn. `audio_refs` maps USER_AUDIO/PLAYED_AUDIO/GENERATED_AUDIO to
    `weave://` refs of published WAV Content (a missing one is simply not attached); `history` is the
    conversation before this turn (`turn_messages` of each earlier turn), the chats' context."""
    history = history or []
    key = turn["key"]
    model = meta.get("model") or "gpt-realtime"
    resource, provenance = _resource(), _provenance()
    trace_id = _id(128, session, key, "trace")
    turn_ctx = SpanContext(trace_id, _id(64, session, key, "turn"), is_remote=False,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED))
    started, ended = int(turn["started_ns"]), int(turn["ended_ns"])
    user, assistant, timing = turn["user"], turn["assistant"], turn.get("timing") or {}
    cut = assistant.get("barge_in")

    user_message, heard = turn_messages(turn, audio_refs)
    generated = Message(role="assistant", parts=[
        *([TextPart(content=assistant["transcript_generated"])] if assistant.get("transcript_generated") else []),
        *_audio_part(audio_refs.get(GENERATED_AUDIO))])

    def span(name: str, role: str, attrs: dict[str, Any], start: int, end: int, parent: SpanContext | None,
             error: str | None = None) -> ReadableSpan:
        context = turn_ctx if parent is None else SpanContext(
            trace_id, _id(64, session, key, role), is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        status = Status(StatusCode.ERROR, error) if error else Status(StatusCode.OK)
        return ReadableSpan(name=name, context=context, parent=parent, resource=resource,
                            attributes=_clean({**attrs, **provenance}), kind=SpanKind.INTERNAL, status=status,
                            start_time=start, end_time=max(end, start), instrumentation_scope=SCOPE)

    turn_attrs = invoke_agent_attributes(
        agent_name=AGENT_NAME, conversation_id=session, conversation_name=meta.get("name") or "",
        provider_name=PROVIDER, model=model, input_messages=[user_message], output_messages=[heard])
    turn_attrs.update({
        "voicebus.session": session, "voicebus.turn": turn.get("turn"), "voicebus.protocol": meta.get("protocol"),
        "voicebus.server_session_id": meta.get("server_session_id"),
        "voicebus.user.audio_start_ms": user.get("audio_start_ms"), "voicebus.user.audio_end_ms": user.get("audio_end_ms"),
        "voicebus.assistant.status": assistant.get("status"), "voicebus.assistant.barge_in": bool(cut),
        "voicebus.assistant.played_ms": assistant.get("played_ms"),
        "voicebus.assistant.generated_ms": assistant.get("generated_ms"),
        "voicebus.assistant.transcript_heard": assistant.get("transcript_heard"),
        "voicebus.assistant.transcript_generated": assistant.get("transcript_generated"),
        "voicebus.barge_in.audio_end_ms": assistant.get("played_ms") if cut else None,
        "voicebus.latency.speech_end_to_first_played_ms": timing.get("speech_end_to_first_played_ms"),
        "voicebus.latency.speech_end_to_first_delta_ms": timing.get("speech_end_to_first_delta_ms"),
        "voicebus.tool_ms": timing.get("tool_ms"), "voicebus.cost_usd": turn.get("cost_usd"),
        "voicebus.events": [json.dumps(e, default=str) for e in turn.get("events") or []] or None,
    })
    spans = [span(f"invoke_agent {AGENT_NAME}", "turn", turn_attrs, started, ended, None)]

    responses = turn.get("responses") or _responses_of_an_older_store(turn)
    tools = turn.get("tools") or []
    for index, response in enumerate(responses):
        calls_tools = "function_call" in (response.get("output") or []) or (
            not response.get("output") and response["id"] == assistant.get("tool_response_id"))
        if calls_tools:  # the response that asked for the tools: its output is the calls
            output = [Message(role="assistant", parts=[ToolCallPart(
                id=t.get("call_id") or "", name=t.get("name") or "", arguments=json.dumps(t.get("arguments")))
                for t in tools])]
            inputs = [*history, user_message]
        else:  # the spoken answer, as generated (the turn span holds it as heard)
            output = [generated]
            inputs = [*history, user_message]
            if tools:  # the context of a follow-up: the calls the model made and what they returned
                inputs += [Message(role="assistant", parts=[ToolCallPart(
                    id=t.get("call_id") or "", name=t.get("name") or "", arguments=json.dumps(t.get("arguments")))
                    for t in tools]), Message(role="tool", parts=[ToolCallResponsePart(
                        id=t.get("call_id") or "", response=t.get("output") or t.get("error") or "") for t in tools])]
        refs = [audio_refs[name] for name in (USER_AUDIO, GENERATED_AUDIO) if audio_refs.get(name)
                and (name == USER_AUDIO or not calls_tools)]
        attrs = llm_attributes(model=model, provider_name=PROVIDER, conversation_id=session,
                               input_messages=inputs, output_messages=output, usage=_usage(response.get("usage")),
                               response_id=response.get("id") or "", response_model=model,
                               finish_reasons=[response["status"]] if response.get("status") else [],
                               output_type="text" if calls_tools else "speech")
        attrs.update({"weave.content_refs": refs or None, "voicebus.response.status": response.get("status"),
                      "voicebus.response.status_reason": response.get("reason")})
        start = response.get("created_ns") or started
        end = response.get("done_ns") or ended
        failed = response.get("status") == "failed"
        spans.append(span(f"chat {model}", f"chat/{index}", attrs, start, end, turn_ctx,
                          error=f"response {response.get('reason') or 'failed'}" if failed else None))

    for index, tool in enumerate(tools):
        attrs = execute_tool_attributes(
            tool_name=tool.get("name") or "", conversation_id=session, tool_call_id=tool.get("call_id") or "",
            tool_call_arguments=json.dumps(tool.get("arguments")), tool_call_result=tool.get("output") or "",
            # the Realtime server's own call on a remote MCP server is an extension of the model, not our function
            tool_type="extension" if str(tool.get("source") or "").startswith("server-mcp:") else "function")
        attrs.update({"voicebus.tool.source": tool.get("source"), "voicebus.tool.error": tool.get("error"),
                      "voicebus.tool.duration_ms": tool.get("tool_ms"),
                      "voicebus.tool.round_trip_ms": tool.get("round_trip_ms")})
        start = tool.get("called_ns") or started
        end = tool.get("answered_ns") or (start + int((tool.get("round_trip_ms") or 0) * 1e6))
        spans.append(span(f"execute_tool {tool.get('name') or ''}".rstrip(), f"tool/{index}", attrs, start, end,
                          turn_ctx, error=tool.get("error")))
    return spans


def _responses_of_an_older_store(turn: dict[str, Any]) -> list[dict[str, Any]]:
    """Turns stored before responses were kept one by one: what the turn record still says of them."""
    assistant = turn["assistant"]
    out = []
    if assistant.get("tool_response_id"):
        out.append({"id": assistant["tool_response_id"], "output": ["function_call"]})
    if assistant.get("response_id"):
        out.append({"id": assistant["response_id"], "status": assistant.get("status"), "usage": turn.get("usage")})
    return out


def span_ids(spans: list[ReadableSpan]) -> list[str]:
    return [format(s.context.span_id, "016x") for s in spans]


def exporter(trace_server_url: str, project_id: str, api_key: str) -> Callable[[list[ReadableSpan]], bool]:
    """Send spans to Weave's GenAI ingest as weave's own exporter does (OTLP protobuf over HTTP, the
    project in a `project_id` header, the key as basic auth); True once the server took them all."""
    import requests
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult
    from weave.trace.urls import otel_traces_endpoint

    session = requests.Session()
    session.headers["project_id"] = project_id
    session.auth = ("api", api_key)
    otlp = OTLPSpanExporter(endpoint=otel_traces_endpoint(trace_server_url), session=session,
                            timeout=EXPORT_TIMEOUT_S)

    def export(spans: list[ReadableSpan]) -> bool:
        return otlp.export(spans) == SpanExportResult.SUCCESS

    return export
