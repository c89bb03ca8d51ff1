"""WAV in and out, with clear errors: the notebook wrote 24 kHz audio under a 22 050 Hz header.

Reading accepts integer PCM of 8/16/24/32 bits (converted to s16le); float or compressed WAVs get
a one-line error that says how to convert them. Writing streams s16le and keeps the header true
after every `flush()`, so a killed writer leaves a playable file.
"""

from __future__ import annotations

import struct
import wave
from dataclasses import dataclass
from pathlib import Path


class WavError(ValueError):
    pass


@dataclass(frozen=True)
class WavAudio:
    pcm: bytes  # s16le interleaved
    rate: int
    channels: int

    @property
    def frames(self) -> int:
        return len(self.pcm) // (2 * self.channels)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def _format_tag(path: Path) -> int | None:
    """The fmt chunk's format tag (1 = PCM, 3 = float, 0xFFFE = extensible), or None if not RIFF/WAVE."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while chunk := f.read(8):
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                body = f.read(min(size, 40))
                tag = struct.unpack("<H", body[:2])[0]
                if tag == 0xFFFE and len(body) >= 26:  # extensible: the real tag is in the sub-format GUID
                    tag = struct.unpack("<H", body[24:26])[0]
                return tag
            f.seek(size + (size & 1), 1)
    return None


def read_wav(path: str | Path) -> WavAudio:
    path = Path(path)
    if not path.is_file():
        raise WavError(f"{path}: no such file")
    tag = _format_tag(path)
    if tag is None:
        raise WavError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    if tag != 1:
        kind = {3: "floating-point", 6: "A-law", 7: "mu-law"}.get(tag, f"format {tag}")
        raise WavError(f"{path}: {kind} WAV is not supported; convert it with "
                       f"`sox {path.name} -b 16 -e signed-integer out.wav`")
    try:
        with wave.open(str(path), "rb") as wav:
            width, rate, channels = wav.getsampwidth(), wav.getframerate(), wav.getnchannels()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: unreadable WAV ({exc})") from exc
    if rate <= 0 or channels <= 0:
        raise WavError(f"{path}: bad header (rate {rate}, channels {channels})")
    usable = len(raw) - len(raw) % (width * channels)
    if usable == 0:
        raise WavError(f"{path}: contains no audio frames")
    return WavAudio(_to_s16(raw[:usable], width), rate, channels)


def _to_s16(raw: bytes, width: int) -> bytes:
    if width == 2:
        return raw
    import numpy as np  # only for other widths: stages that just write 16-bit WAVs skip its ~15 MB

    if width == 1:  # unsigned 8-bit
        return ((np.frombuffer(raw, dtype=np.uint8).astype(np.int16) - 128) << 8).astype("<i2").tobytes()
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        return (b[:, 1].astype(np.int16) | (b[:, 2].astype(np.int8).astype(np.int16) << 8)).astype("<i2").tobytes()
    if width == 4:
        return (np.frombuffer(raw, dtype="<i4") >> 16).astype("<i2").tobytes()
    raise WavError(f"{width * 8}-bit samples are not supported")


class WavWriter:
    """Streams s16le into a WAV; the header is rewritten on flush() and close()."""

    def __init__(self, path: str | Path, rate: int, channels: int = 1) -> None:
        self.path = Path(path)
        self.rate, self.channels = rate, channels
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(self.path), "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(rate)
        self.frames = 0

    def write(self, pcm: bytes) -> None:
        self._wav.writeframesraw(pcm)
        self.frames += len(pcm) // (2 * self.channels)

    def flush(self) -> None:
        """Patch the header to the frames written so far (wave does this in writeframes)."""
        self._wav.writeframes(b"")
        self._wav._file.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._wav.close()


def write_wav(path: str | Path, pcm: bytes, rate: int, channels: int = 1) -> Path:
    writer = WavWriter(path, rate, channels)
    writer.write(pcm)
    writer.close()
    return writer.path
