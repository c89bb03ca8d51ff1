#!/usr/bin/env python3
"""The original notebook's realtime design, rebuilt for side-by-side measurement (not for use).

One process: the mic callback appends to a list; every 300 ms of audio the chunk is resampled on
its own with `resampy.resample` (48 kHz -> 24 kHz) and sent as one `input_audio_buffer.append`;
assistant audio deltas are played with a blocking write in the websocket thread. Used by
scripts/bench_gateway.py; run alone it sends one WAV to a simulator and prints the latencies.

    .venv/bin/python scripts/baseline_notebook.py question48k.wav --url ws://127.0.0.1:8765/v1/realtime?model=gpt-realtime
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import resampy
import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.wavio import read_wav  # noqa: E402

CHUNK_MS = 300
FRAME_MS = 20
SESSION_UPDATE = {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
    "transcription": {"model": "whisper-1"},  # the notebook's settings: whisper-1, server VAD 0.3/300/600
    "turn_detection": {"type": "server_vad", "threshold": 0.3, "prefix_padding_ms": 300, "silence_duration_ms": 600}}}}}


def send_chunk(ws: websocket.WebSocket, pcm: bytes, rate: int) -> None:
    """The notebook's step: resample one chunk on its own (resampy, no state) and append it."""
    mono = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    out = (np.clip(resampy.resample(mono, rate, 24000), -1, 1) * 32767).astype("<i2").tobytes()
    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(out).decode()}))


def run_notebook(wav_path: str, url: str, tail_s: float = 2.0) -> dict[str, list[float]]:
    """Returns {'append_ms': mic frame callback -> the append that carried it, per frame}."""
    audio = read_wav(wav_path)
    rate = audio.rate
    frame_bytes = rate * FRAME_MS // 1000 * 2
    pcm = audio.pcm + bytes(int(tail_s * rate) * 2)
    ws = websocket.create_connection(url, header=["Authorization: Bearer notebook"], timeout=10)
    ws.send(json.dumps(SESSION_UPDATE))
    latencies: list[float] = []
    pending: list[tuple[bytes, int]] = []  # (frame, callback time) waiting for a full chunk
    done = threading.Event()

    def reader() -> None:  # the notebook played each delta with a blocking write in this thread
        ws.settimeout(1.0)
        while not done.is_set():
            try:
                event = json.loads(ws.recv())
            except (websocket.WebSocketTimeoutException, ValueError):
                continue
            except websocket.WebSocketException:
                return
            if event.get("type") == "response.output_audio.delta":
                samples = len(base64.b64decode(event["delta"])) // 2
                time.sleep(samples / 24000)  # stream.write(...) blocks for the chunk's duration

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), frame_bytes)):
        delay = started + index * FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pending.append((pcm[offset:offset + frame_bytes], time.monotonic_ns()))
        if len(pending) * FRAME_MS >= CHUNK_MS:
            send_chunk(ws, b"".join(frame for frame, _ in pending), rate)
            sent = time.monotonic_ns()
            latencies += [(sent - t) / 1e6 for _, t in pending]
            pending.clear()
    done.set()
    thread.join(timeout=2)
    ws.close()
    return {"append_ms": latencies}


def run_notebook_devices(url: str, mic_rate: int = 48000) -> None:
    """The same design on the default PyAudio devices, until SIGTERM (the bench_pipeline peer)."""
    import signal

    import pyaudio

    pa = pyaudio.PyAudio()
    ws = websocket.create_connection(url, header=["Authorization: Bearer notebook"], timeout=10,
                                     enable_multithread=True)
    ws.send(json.dumps(SESSION_UPDATE))
    chunk: list[bytes] = []

    def on_audio(in_data, _count, _info, _status):  # the notebook resampled and sent from the callback
        chunk.append(in_data)
        if len(chunk) * FRAME_MS >= CHUNK_MS:
            send_chunk(ws, b"".join(chunk), mic_rate)
            chunk.clear()
        return None, pyaudio.paContinue

    mic = pa.open(format=pyaudio.paInt16, channels=1, rate=mic_rate, input=True,
                  frames_per_buffer=mic_rate * FRAME_MS // 1000, stream_callback=on_audio)
    speaker = pa.open(format=pyaudio.paInt16, channels=1, rate=24000, output=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ws.settimeout(0.5)
    while not stop.is_set():
        try:
            event = json.loads(ws.recv())
        except (websocket.WebSocketTimeoutException, ValueError):
            continue
        if event.get("type") == "response.output_audio.delta":
            speaker.write(base64.b64decode(event["delta"]))  # blocking playback in the socket thread
    mic.close()
    speaker.close()
    pa.terminate()
    ws.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav", nargs="?", help="a WAV to send (measures the append path), or --devices")
    parser.add_argument("--url", required=True)
    parser.add_argument("--devices", action="store_true", help="run on the default PyAudio devices until SIGTERM")
    args = parser.parse_args()
    if args.devices:
        run_notebook_devices(args.url)
        sys.exit(0)
    result = run_notebook(args.wav, args.url)
    values = np.array(result["append_ms"])
    print(f"notebook design: mic frame -> append p50 {np.percentile(values, 50):.1f} ms, "
          f"p99 {np.percentile(values, 99):.1f} ms over {len(values)} frames")
