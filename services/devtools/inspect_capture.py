"""`voicebus inspect`: what a capture holds — topics, gaps, bad records, an audio topic as WAV, events."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import click

from common.capture_file import ReadReport, read_capture
from common.envelope import AudioHeader, EnvelopeError, decode
from common.wavio import write_wav


def summarize(path: str) -> int:
    report = ReadReport()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    last_seq: dict[tuple[str, str], int] = {}
    gaps: Counter[tuple[str, str]] = Counter()
    first = last = None
    for record in read_capture(path, report):
        first = record.t_recv_ns if first is None else first
        last = record.t_recv_ns
        try:
            message = decode(record.frames)
        except EnvelopeError as exc:
            bad[exc.reason] += 1
            continue
        counts[message.topic] += 1
        sizes[message.topic] += sum(len(f) for f in record.frames)
        key = (message.header.src, message.topic)
        previous = last_seq.get(key)
        if previous is not None and message.header.seq > previous + 1:
            gaps[key] += message.header.seq - previous - 1
        last_seq[key] = message.header.seq
    duration = (last - first) / 1e9 if first is not None else 0.0
    click.echo(f"{path}: {report.records} records over {duration:.2f} s")
    if report.lost_bytes:
        click.echo(f"  incomplete tail: {report.lost_bytes} bytes unreadable ({report.reason}); "
                   "everything before it is intact")
    click.echo(f"  {'topic':<52} {'count':>7} {'KB':>9}")
    for topic, n in sorted(counts.items()):
        click.echo(f"  {topic:<52} {n:>7} {sizes[topic] / 1024:>9.1f}")
    if gaps:
        click.echo("  gaps (messages missing per publisher and topic):")
        for (src, topic), n in sorted(gaps.items()):
            click.echo(f"    {src} {topic}: {n}")
    else:
        click.echo("  gaps: none")
    if report.malformed:
        bad["not [t_recv_ns, [bytes...]]"] += report.malformed
    click.echo(f"  bad records: {sum(bad.values())}" + (f" ({dict(bad)})" if bad else ""))
    return 0


def capture_audio(path: str | Path, topic: str) -> tuple[bytes, int, int, int, bool]:
    """An audio topic of a capture as one PCM stream by pts: (pcm, rate, channels, samples of gaps filled
    with silence, whether the format changed); ValueError if the topic has no audio in it."""
    streams: dict[tuple[int, int], dict[int, bytes]] = defaultdict(dict)
    for record in read_capture(path):
        try:
            message = decode(record.frames)
        except EnvelopeError:
            continue
        if message.topic == topic and isinstance(message.header, AudioHeader):
            streams[(message.header.rate, message.header.channels)][message.header.pts] = message.payload
    if not streams:
        raise ValueError(f"no audio on topic {topic!r} in {path}")
    (rate, channels), frames = max(streams.items(), key=lambda kv: len(kv[1]))
    pcm = bytearray()
    filled = 0
    start = min(frames)
    for pts in sorted(frames):
        expected = start + len(pcm) // (2 * channels)
        if pts > expected:
            filled += pts - expected
            pcm += bytes((pts - expected) * 2 * channels)
        elif pts < expected:  # overlap (a restarted stream): keep the newest samples
            del pcm[(pts - start) * 2 * channels:]
        pcm += frames[pts]
    return bytes(pcm), rate, channels, filled, len(streams) > 1


def export_wav(path: str, topic: str, out: str) -> int:
    """Concatenate an audio topic by pts; silence where the stream had gaps (and say how much)."""
    try:
        pcm, rate, channels, filled, changed = capture_audio(path, topic)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    write_wav(Path(out), pcm, rate, channels)
    click.echo(f"wrote {out}: {len(pcm) / (2 * channels * rate):.2f} s at {rate} Hz, {channels} ch"
               + (f"; {filled / rate * 1000:.0f} ms of gaps filled with silence" if filled else "; no gaps"))
    if changed:
        click.echo(f"note: {topic} changed format during the capture; exported the longest ({rate} Hz)")
    return 0


def print_events(path: str) -> int:
    first = None
    for record in read_capture(path):
        first = record.t_recv_ns if first is None else first
        try:
            message = decode(record.frames)
        except EnvelopeError:
            continue
        if not message.topic.startswith(("rt.", "player.flush", "launcher.")) or message.topic.endswith(
                ("input_audio_buffer.append", "output_audio.delta")):
            continue
        event = message.data.get("event", message.data)
        detail = {k: v for k, v in event.items() if k in ("transcript", "delta", "audio_start_ms", "audio_end_ms",
                                                          "item_id", "reason", "status", "audio_end_ms")}
        if "response" in event:
            detail["status"] = event["response"].get("status")
        click.echo(f"{(record.t_recv_ns - first) / 1e9:9.3f}s  {message.topic:<58} {json.dumps(detail)[:120]}")
    return 0
