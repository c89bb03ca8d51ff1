"""The notebook's way, traced by weave's own OpenAI Realtime integration: for the side-by-side test.

A websocket-client `WebSocketApp` session (the notebook's client) against the simulator, wrapped by
`weave.integrations.openai_realtime.connection.WebSocketApp` (what `weave.init` patches
`websocket.WebSocketApp` with, but only for URLs under wss://api.openai.com, so it is applied here by
hand), with weave's OTel exporter pointed at the loopback trace server by the environment.

Speaks the given questions one after another (each: its audio, then silence for the server's VAD),
answers a function call with a fixed output, and closes after the last spoken reply.

    python tests/weave_notebook_session.py SIM_BASE_URL PROJECT QUESTION.wav [QUESTION.wav ...]
"""

from __future__ import annotations

import base64
import json
import sys
import threading

import websocket

APPEND_BYTES = 4800  # 100 ms of 24 kHz s16
SILENCE = bytes(24000 * 2 * 2)  # 2 s: the server's VAD ends the turn in it
TOOL_OUTPUT = json.dumps({"timezone": "Asia/Tokyo", "datetime": "2026-12-07T05:02:00+09:00"})
TIMEOUT_S = 90


def main(base_url: str, project: str, wavs: list[str]) -> int:
    import weave
    from weave.integrations.openai_realtime import connection

    from common.config import realtime_ws_url
    from common.wavio import read_wav
    from services.stages.gateway.session import SessionSettings, session_update

    weave.init(project)
    questions = [read_wav(path).pcm for path in wavs]
    spoken_replies, finished = [0], threading.Event()
    tools = [{"name": "get_current_time", "description": "The current time in a timezone",
              "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}]

    def speak(ws, pcm: bytes) -> None:
        audio = pcm + SILENCE
        for offset in range(0, len(audio), APPEND_BYTES):
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(audio[offset:offset + APPEND_BYTES]).decode()}))

    def on_open(ws) -> None:
        ws.send(json.dumps(session_update(SessionSettings(), "ga", tools)))
        speak(ws, questions[0])

    def on_message(ws, message: str) -> None:
        event = json.loads(message)
        if event.get("type") != "response.done":
            return
        outputs = event["response"].get("output") or []
        calls = [o for o in outputs if o.get("type") == "function_call"]
        for call in calls:
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": call["call_id"], "output": TOOL_OUTPUT}}))
        if calls:
            ws.send(json.dumps({"type": "response.create"}))
            return
        spoken_replies[0] += 1
        if spoken_replies[0] < len(questions):
            speak(ws, questions[spoken_replies[0]])
        else:
            finished.set()

    app = connection.WebSocketApp(realtime_ws_url(base_url, "gpt-realtime"),
                                  header=["Authorization: Bearer sk-notebook-test"], on_open=on_open,
                                  on_message=on_message, original_websocket_app=websocket.WebSocketApp)
    runner = threading.Thread(target=app.run_forever, daemon=True)
    runner.start()
    ok = finished.wait(TIMEOUT_S)
    app.close()  # weave's integration ends its session span here
    runner.join(10)
    from opentelemetry import trace

    trace.get_tracer_provider().force_flush()
    weave.get_client().flush()
    print(json.dumps({"spoken_replies": spoken_replies[0], "finished": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
