"""libopus's decoder, called directly (ctypes), at the rate we want rather than FFmpeg's 48 kHz.

PyAV's wrapper around libopus (FFmpeg's `libopus` decoder) always decodes at 48 kHz, so the web
stage then filtered every browser frame down to 24 kHz in numpy: a quarter of its Python time per
conversation (py-spy). libopus decodes at 8, 12, 16, 24 or 48 kHz natively (the codec's bands above
the rate's Nyquist are simply not synthesised), which is the same audio without the second filter.

The library is the system's (Debian's libopus0) or else the copy PyAV's wheel ships (`av.libs/`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

OPUS_OK = 0
OPUS_RATES = (8000, 12_000, 16_000, 24_000, 48_000)
MAX_PACKET_MS = 120  # the longest an Opus packet can last (RFC 6716)


class OpusError(Exception):
    """A packet libopus could not decode (or a decoder it could not create)."""


class LibOpusMissing(OpusError):
    pass


_lib: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    found = ctypes.util.find_library("opus")
    try:
        import av

        bundled = sorted(glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libopus*.so*")))
    except ImportError:
        bundled = []
    return [name for name in (found, *bundled) if name]


def load() -> ctypes.CDLL:
    """libopus, loaded once; LibOpusMissing says where it was looked for."""
    global _lib
    if _lib is not None:
        return _lib
    tried = _candidates()
    for name in tried:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.restype = None
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_strerror.restype = ctypes.c_char_p
        lib.opus_strerror.argtypes = [ctypes.c_int]
        _lib = lib
        return lib
    raise LibOpusMissing(f"libopus not found (tried {tried or 'nothing: no system libopus, no PyAV wheel'}); "
                         "install it (apt-get install libopus0) or run the web stage with --aiortc-decoder")


class Decoder:
    """One Opus stream -> s16 PCM at `rate`: `decode(packet)` gives that packet's samples as bytes."""

    def __init__(self, rate: int, channels: int = 1) -> None:
        self._state = None
        if rate not in OPUS_RATES or channels not in (1, 2):
            raise OpusError(f"libopus decodes at {OPUS_RATES} Hz, 1 or 2 channels; not {rate} Hz x {channels}")
        self.lib, self.rate, self.channels = load(), rate, channels
        error = ctypes.c_int(OPUS_OK)
        self._state = self.lib.opus_decoder_create(rate, channels, ctypes.byref(error))
        if error.value != OPUS_OK or not self._state:
            raise OpusError(f"opus_decoder_create: {self._reason(error.value)}")
        self._max_samples = rate * MAX_PACKET_MS // 1000
        self._pcm = ctypes.create_string_buffer(self._max_samples * channels * 2)

    def decode(self, packet: bytes) -> bytes:
        """The packet's PCM (s16, interleaved); OpusError for a packet that is not Opus. An empty
        packet is refused too: libopus would take it for a lost one and conceal 120 ms of audio."""
        if not packet:
            raise OpusError("opus_decode: empty packet")
        samples = self.lib.opus_decode(self._state, packet, len(packet), self._pcm, self._max_samples, 0)
        if samples < 0:
            raise OpusError(f"opus_decode: {self._reason(samples)}")
        return ctypes.string_at(self._pcm, samples * self.channels * 2)

    def _reason(self, code: int) -> str:
        return (self.lib.opus_strerror(code) or b"unknown error").decode(errors="replace")

    def close(self) -> None:
        if getattr(self, "_state", None):
            self.lib.opus_decoder_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()
