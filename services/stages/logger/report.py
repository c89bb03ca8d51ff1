"""`voicebus report`: one self-contained HTML page per stored session, for looking at it offline.

Everything is inline (waveform PNGs and WAVs as data: URIs), so the file can be mailed or attached
to a bug report. It shows what the store holds: nothing is recomputed from the bus.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.wavio import read_wav
from services.stages.logger.store import load_json, load_turns

WAVEFORM_SIZE = (7.0, 1.1)


def _waveform_png(pcm: bytes, rate: int, color: str, mark_ms: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    fig, ax = plt.subplots(figsize=WAVEFORM_SIZE, dpi=90)
    if len(samples):
        step = max(1, len(samples) // 4000)
        t = np.arange(0, len(samples), step) / rate
        ax.plot(t, samples[::step], color=color, linewidth=0.6)
    if mark_ms is not None:
        ax.axvline(mark_ms / 1000, color="#d33", linewidth=1.2, linestyle="--")
    ax.set_ylim(-1, 1)
    ax.set_yticks([])
    ax.set_xlabel("s", fontsize=7, labelpad=1)
    ax.tick_params(labelsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _audio_block(session_dir: Path, files: dict[str, str], name: str, label: str, color: str,
                 mark_ms: float | None = None) -> str:
    path = session_dir / files[name] if name in files else None
    if path is None or not path.exists():
        return f"<div class='audio'><b>{label}</b>: none</div>"
    audio = read_wav(path)
    wav_uri = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()
    return (f"<div class='audio'><b>{label}</b> ({audio.seconds:.2f} s)<br>"
            f"<img alt='{label} waveform' src='{_waveform_png(audio.pcm, audio.rate, color, mark_ms)}'><br>"
            f"<audio controls preload='none' src='{wav_uri}'></audio></div>")


def _ms(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, (int, float)) else "–"


def render(session_dir: Path) -> str:
    meta = load_json(session_dir / "meta.json") or {}
    turns = load_turns(session_dir)
    events_path = session_dir / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()] \
        if events_path.exists() else []
    title = html.escape(meta.get("session", session_dir.name))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>voicebus session {title}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto;color:#222}"
             ".turn{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}"
             ".user{color:#1f5fa8}.assistant{color:#2a7a2a}.barge{color:#c33;font-weight:bold}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;font-size:90%}"
             ".timeline{position:relative;height:2.2em;background:#f4f4f4;margin:.5em 0}"
             ".seg{position:absolute;top:.2em;height:1.8em;opacity:.8;font-size:70%;color:#fff;overflow:hidden}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>voicebus session {title}</h1>",
             f"<p>model <b>{html.escape(str(meta.get('model')))}</b>, protocol {html.escape(str(meta.get('protocol')))},"
             f" {len(turns)} turn(s), total cost ${sum(t.get('cost_usd', 0) for t in turns):.4f}</p>"]
    parts.append(_timeline(turns))
    parts.append("<table><tr><th>turn</th><th>speech end → first delta</th><th>speech end → first played</th>"
                 "<th>of which tools</th><th>played / generated</th><th>tokens</th><th>cost</th></tr>")
    for turn in turns:
        assistant, timing = turn.get("assistant", {}), turn.get("timing", {})
        parts.append(f"<tr><td>{turn['turn']}</td><td>{_ms(timing.get('speech_end_to_first_delta_ms'))}</td>"
                     f"<td>{_ms(timing.get('speech_end_to_first_played_ms'))}</td>"
                     f"<td>{_ms(timing.get('tool_ms'))}</td>"
                     f"<td>{_ms(assistant.get('played_ms'))} / {_ms(assistant.get('generated_ms'))}</td>"
                     f"<td>{turn.get('usage', {}).get('total_tokens', '–')}</td><td>${turn.get('cost_usd', 0):.4f}</td></tr>")
    parts.append("</table>")
    for turn in turns:
        files = turn.get("audio_files", {})
        if turn.get("kind") == "say":
            parts.append(f"<div class='turn'><h2>say</h2><p class='user'>prompt: {html.escape(turn['prompt'])}</p>"
                         f"<p class='assistant'>answer: {html.escape(turn['transcript'])}</p>"
                         + _audio_block(session_dir, files, "answer", "answer", "#2a7a2a") + "</div>")
            continue
        user, assistant = turn["user"], turn["assistant"]
        barge = (f"<p class='barge'>barge-in: the user interrupted after {assistant['played_ms']:.0f} ms of "
                 f"{assistant['generated_ms']:.0f} ms</p>") if assistant.get("barge_in") else ""
        parts.append(
            f"<div class='turn'><h2>turn {turn['turn']}</h2>"
            f"<p class='user'>user: {html.escape(str(user.get('transcript')))}</p>"
            f"<p class='assistant'>assistant (heard): {html.escape(str(assistant.get('transcript_heard')))}</p>"
            + (f"<p>generated: {html.escape(str(assistant.get('transcript_generated')))}</p>" if assistant.get("barge_in")
               else "") + barge + "".join(_tool_line(t) for t in turn.get("tools", []))
            + _audio_block(session_dir, files, "user", "user audio", "#1f5fa8")
            + _audio_block(session_dir, files, "assistant-generated", "assistant audio (generated; red line: where "
                           "playback stopped)" if assistant.get("barge_in") else "assistant audio", "#2a7a2a",
                           assistant.get("played_ms") if assistant.get("barge_in") else None)
            + "".join(f"<p>event: {html.escape(json.dumps(e))}</p>" for e in turn.get("events", [])
                      if e.get("kind") != "barge_in") + "</div>")
    if events:
        parts.append("<h2>session events</h2><ul>" + "".join(f"<li>{html.escape(json.dumps(e))}</li>"
                                                             for e in events) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


COLORS = {"user": "#1f5fa8", "assistant": "#2a7a2a", "tool": "#c06000"}


def _tool_line(tool: dict[str, Any]) -> str:
    result = (f"<span class='barge'>error: {html.escape(str(tool.get('error')))}</span>" if tool.get("error")
              else html.escape(str(tool.get("output"))[:300]))
    return (f"<p class='tool'>tool call: <b>{html.escape(str(tool.get('name')))}</b>"
            f"({html.escape(json.dumps(tool.get('arguments')))}) → {result} "
            f"<small>({_ms(tool.get('round_trip_ms'))}, {html.escape(str(tool.get('source')))})</small></p>")


def _timeline(turns: list[dict[str, Any]]) -> str:
    """Who spoke when: user speech and assistant playback on one time axis (from the stored timings)."""
    spans = []
    for turn in turns:
        timing, user, assistant = turn.get("timing", {}), turn.get("user", {}), turn.get("assistant", {})
        end = timing.get("speech_end_ns")
        if end and user.get("audio_ms"):
            spans.append(("user", end - int(user["audio_ms"] * 1e6), end, turn["turn"]))
        for tool in turn.get("tools", []):
            if tool.get("called_ns") and tool.get("answered_ns"):
                spans.append(("tool", tool["called_ns"], tool["answered_ns"], turn["turn"]))
        played = timing.get("first_played_ns")
        if played:
            spans.append(("assistant", played, played + int(assistant.get("played_ms", 0) * 1e6), turn["turn"]))
    if not spans:
        return ""
    start, stop = min(s[1] for s in spans), max(s[2] for s in spans)
    width = max(stop - start, 1)
    bars = "".join(
        f"<div class='seg' title='{who} turn {n}' style='left:{100 * (a - start) / width:.2f}%;"
        f"width:{max(0.4, 100 * (b - a) / width):.2f}%;background:{COLORS[who]}'>"
        f"{who[0].upper()}{n}</div>" for who, a, b, n in spans)
    return (f"<p>timeline ({width / 1e9:.1f} s; blue: user speaking, orange: tool calls, green: assistant "
            f"playing)</p>"
            f"<div class='timeline'>{bars}</div>")


def write_report(session_dir: Path, out: Path) -> Path:
    if not (session_dir / "meta.json").exists():
        raise FileNotFoundError(f"{session_dir}: not a voicebus session directory")
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(render(session_dir))
    partial.replace(out)  # a page served while it is written is the old one or the whole new one
    return out
