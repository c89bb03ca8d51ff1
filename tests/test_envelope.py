"""Codec round trips and rejection reasons; fuzzing the decoder directly."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.envelope import AudioHeader, EnvelopeError, EventHeader, Stamper, decode, encode


def test_audio_round_trip_keeps_payload_bytes_and_header():
    stamper = Stamper("mic", "s1")
    pcm = bytes(range(256)) * 15  # 3840 bytes = 1920 stereo s16 frames
    message = stamper.audio("audio.mic", pcm, rate=48000, channels=2, pts=960, t_capture_ns=123, t_ns=456,
                            item_id="item_1")
    frames = encode(message)
    assert frames[0] == b"audio.mic" and frames[2] == pcm
    decoded = decode(frames)
    assert decoded == message
    assert isinstance(decoded.header, AudioHeader)
    assert decoded.samples == 960 and decoded.duration_ms == 20.0
    assert decoded.header.extra == {"item_id": "item_1"}


def test_event_round_trip_and_seq_rises():
    stamper = Stamper("gateway", "s1")
    first = stamper.event("rt.response.done", {"usage": {"total_tokens": 5}}, 1)
    second = stamper.event("player.flush", {}, 2)
    third = stamper.event("rt.response.done", {}, 3)
    assert decode(encode(first)) == first
    assert isinstance(decode(encode(first)).header, EventHeader)
    assert len(encode(second)) == 2  # events have no payload frame
    assert (first.header.seq, second.header.seq, third.header.seq) == (0, 0, 1)  # one counter per topic


def _header(**over):
    base = {"v": 1, "src": "x", "seq": 0, "t_ns": 1, "session": "s"}
    base.update(over)
    return msgpack.packb(base)


AUDIO = {"rate": 24000, "channels": 1, "fmt": "s16le", "pts": 0, "t_capture_ns": 1}


@pytest.mark.parametrize(("frames", "reason"), [
    ([b"audio.user"], "part_count"),
    ([b"a", b"b", b"c", b"d"], "part_count"),
    ([b"\xff\xfe", _header()], "bad_topic"),
    ([b"Bad Topic", _header()], "bad_topic"),
    ([b"rt.x", b"\xc1"], "bad_msgpack"),
    ([b"rt.x", msgpack.packb([1, 2])], "bad_header"),
    ([b"rt.x", _header(seq=-1)], "bad_header"),
    ([b"rt.x", _header(src=5)], "bad_header"),
    ([b"rt.x", _header(v=2)], "bad_version"),
    ([b"audio.user", _header()], "bad_header"),  # audio fields missing
    ([b"audio.user", _header(**AUDIO), b"\x00"], "bad_audio"),  # half a sample
    ([b"audio.user", _header(**{**AUDIO, "fmt": "f32le"}), b"\x00\x00"], "bad_header"),
    ([b"rt.x", _header(), b"payload"], "unexpected_payload"),
    ([b"rt.x", b"\x00" * (65 * 1024)], "oversize"),
])
def test_decode_rejects_with_reason(frames, reason):
    with pytest.raises(EnvelopeError) as info:
        decode(frames)
    assert info.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_decode_fuzz_only_ever_raises_envelope_error(frames):
    try:
        message = decode(frames)
    except EnvelopeError:
        return
    assert decode(encode(message)) == message  # what it accepts round-trips


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "src", "seq", "t_ns", "session", "rate", "channels", "pts",
                                        "t_capture_ns", "fmt", "data"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.none(), st.binary(max_size=4),
                                 st.lists(st.integers(0, 9), max_size=2), st.floats(allow_nan=True))),
       st.sampled_from([b"audio.user", b"rt.response.done"]))
def test_decode_fuzz_structured_headers(fields, topic):
    with contextlib.suppress(EnvelopeError):
        decode([topic, msgpack.packb(fields)])


def test_invalid_utf8_in_a_header_string_is_bad_msgpack():
    """msgspec raises UnicodeDecodeError (not DecodeError) for a str with invalid UTF-8 (the fuzz found it)."""
    header = b"\x81\xa3src\xa2\xe0\x80"  # {"src": <2 bytes that are not UTF-8>}
    with pytest.raises(EnvelopeError) as info:
        decode([b"rt.x", header])
    assert info.value.reason == "bad_msgpack"
