"""`POST /v1/chat/completions` with audio output, streamed (SSE, pcm16) or whole (wav/pcm16)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import wave
from typing import Any

from aiohttp import web

from common.speech import OUTPUT_RATE, synthesize
from services.simulator.protocol import SIMULATOR_MODEL_PREFIX, new_id
from services.simulator.replies import Replies

CHUNK_MS = 100
STREAM_FORMATS = ("pcm16",)
WHOLE_FORMATS = ("wav", "pcm16")


class ChatRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def api_error(status: int, message: str, *, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ChatRequestError("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str):
        raise ChatRequestError("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("'messages' must be a non-empty array", "messages")
    modalities = body.get("modalities") or ["text"]
    if not set(modalities) <= {"text", "audio"}:
        raise ChatRequestError(f"Invalid modalities: {modalities}", "modalities")
    audio = body.get("audio")
    stream = bool(body.get("stream"))
    if "audio" in modalities:
        if not isinstance(audio, dict) or "voice" not in audio or "format" not in audio:
            raise ChatRequestError("audio output requires 'audio': {'voice': ..., 'format': ...}", "audio")
        allowed = STREAM_FORMATS if stream else WHOLE_FORMATS
        if audio["format"] not in allowed:
            raise ChatRequestError(f"Audio format '{audio['format']}' is not supported here"
                                   f"{' when stream=true' if stream else ''}: use {' or '.join(allowed)}.",
                                   "audio.format")
    return {"model": body["model"], "messages": messages, "audio": audio if "audio" in modalities else None,
            "stream": stream, "include_usage": bool((body.get("stream_options") or {}).get("include_usage"))}


def _usage(prompt: str, reply: str, audio_ms: float) -> dict[str, Any]:
    prompt_tokens = math.ceil(1.3 * len(prompt.split())) + 8
    text_tokens = math.ceil(1.3 * len(reply.split()))
    audio_tokens = math.ceil(audio_ms / 50)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": text_tokens + audio_tokens,
            "total_tokens": prompt_tokens + text_tokens + audio_tokens,
            "completion_tokens_details": {"audio_tokens": audio_tokens, "text_tokens": text_tokens}}


def wav_bytes(pcm: bytes, rate: int = OUTPUT_RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


async def chat_completions(request: web.Request, replies: Replies) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return api_error(400, "We could not parse the JSON body of your request.")
    try:
        params = parse_request(body)
    except ChatRequestError as exc:
        return api_error(400, str(exc), param=exc.param)
    prompt = last_user_text(params["messages"])
    reply = replies.reply(prompt)
    model = SIMULATOR_MODEL_PREFIX + params["model"]
    completion_id, created = new_id("chatcmpl"), int(time.time())
    pcm = b""
    if params["audio"] is not None and reply.strip():  # an empty reply rule means "answer without audio"
        pcm = await asyncio.to_thread(synthesize, reply, params["audio"]["voice"], OUTPUT_RATE)
    audio_ms = len(pcm) / (2 * OUTPUT_RATE / 1000)
    if not params["stream"]:
        message: dict[str, Any] = {"role": "assistant", "content": None if pcm else reply, "refusal": None}
        if params["audio"] is not None:
            data = wav_bytes(pcm) if params["audio"]["format"] == "wav" else pcm
            message["audio"] = {"id": new_id("audio"), "data": base64.b64encode(data).decode(),
                                "expires_at": created + 3600, "transcript": reply}
        return web.json_response({"id": completion_id, "object": "chat.completion", "created": created,
                                  "model": model, "choices": [{"index": 0, "message": message,
                                                               "finish_reason": "stop", "logprobs": None}],
                                  "usage": _usage(prompt, reply, audio_ms)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> None:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]}
        if usage:
            payload["usage"] = usage
        await response.write(f"data: {json.dumps(payload)}\n\n".encode())

    await chunk({"role": "assistant", "content": None if pcm else ""})
    if pcm:
        audio_id = new_id("audio")
        await chunk({"audio": {"id": audio_id, "transcript": reply, "expires_at": created + 3600}})
        step = CHUNK_MS * 2 * OUTPUT_RATE // 1000
        for offset in range(0, len(pcm), step):
            await chunk({"audio": {"data": base64.b64encode(pcm[offset:offset + step]).decode()}})
    else:
        for index, word in enumerate(reply.split()):
            await chunk({"content": ("" if index == 0 else " ") + word})
    await chunk({}, finish="stop")
    if params["include_usage"]:
        await chunk({}, usage=_usage(prompt, reply, audio_ms))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
