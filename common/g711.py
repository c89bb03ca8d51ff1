"""G.711 μ-law and A-law: the telephone network's 8-bit samples, as Twilio and the Realtime API's
`audio/pcmu`/`audio/pcma` (beta: `g711_ulaw`/`g711_alaw`) carry them.

Table-driven and bit-exact with the reference coder (CPython's `audioop`, Sun's g711.c, which is
what pipecat and most telephony code use): an encode is one lookup per sample in a 64 Ki table, a
decode one in a 256-entry one (about 10 µs a 20 ms frame, and no numpy: the gateway and the phone
stage stay small). `audioop` itself is gone from Python 3.13, so it is not relied on.

Decoding then encoding gives back the same bytes for every code but μ-law's negative zero (0x7F,
which decodes to 0 like 0xFF): audio that must arrive bit-exact travels as the codes themselves.
"""

from __future__ import annotations

import sys
from array import array
from functools import cache
from typing import Literal

Codec = Literal["pcmu", "pcma"]
CODECS: tuple[Codec, ...] = ("pcmu", "pcma")
RATE = 8000  # G.711 is 8 kHz, one byte a sample
SILENCE = {"pcmu": 0xFF, "pcma": 0xD5}  # the code of a zero sample

_SEG_END_U = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_SEG_END_A = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for segment, end in enumerate(ends):
        if value <= end:
            return segment
    return len(ends)


def _ulaw_code(sample: int) -> int:
    value = sample >> 2  # the reference coder works on 14 bits
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 33
    segment = _segment(value, _SEG_END_U)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def _alaw_code(sample: int) -> int:
    value = sample >> 3  # ... and on 13 bits for A-law
    mask = 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    segment = _segment(value, _SEG_END_A)
    if segment >= 8:
        return 0x7F ^ mask
    quantised = (value >> 1) if segment < 2 else (value >> segment)
    return ((segment << 4) | (quantised & 0x0F)) ^ mask


def _ulaw_sample(code: int) -> int:
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return (0x84 - magnitude) if code & 0x80 else (magnitude - 0x84)


def _alaw_sample(code: int) -> int:
    code ^= 0x55
    magnitude = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    magnitude += 8 if segment == 0 else 0x108
    if segment > 1:
        magnitude <<= segment - 1
    return magnitude if code & 0x80 else -magnitude


@cache
def _encode_table(codec: Codec) -> bytes:
    code = _ulaw_code if codec == "pcmu" else _alaw_code
    # indexed by the sample's 16 bits read as unsigned, so a frame's unsigned view indexes it directly
    return bytes(code(value - 65536 if value >= 32768 else value) for value in range(65536))


@cache
def _decode_table(codec: Codec) -> tuple[bytes, ...]:
    sample = _ulaw_sample if codec == "pcmu" else _alaw_sample
    return tuple(sample(code).to_bytes(2, "little", signed=True) for code in range(256))


def encode(pcm: bytes, codec: Codec) -> bytes:
    """Mono s16le -> G.711 codes (one byte per sample)."""
    samples = array("H")
    samples.frombytes(pcm[:len(pcm) - len(pcm) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    return bytes(map(_encode_table(codec).__getitem__, samples))


def decode(codes: bytes, codec: Codec) -> bytes:
    """G.711 codes -> mono s16le."""
    return b"".join(map(_decode_table(codec).__getitem__, codes))


def check_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown G.711 codec {name!r}: one of {', '.join(CODECS)}")
    return name  # type: ignore[return-value]


def as_s16(payload: bytes, fmt: str) -> bytes:
    """A bus payload as s16le, whatever its format (`AudioHeader.fmt`)."""
    return payload if fmt == "s16le" else decode(payload, check_codec(fmt))
