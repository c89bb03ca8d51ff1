"""Start the browser path (web stage, gateway, logger) and read back what a page played."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from common.resample import resample_oneshot
from tests.helpers import BusClient, Procs
from tests.support.browser import Chromium
from tests.support.rig import Followed, follow

# "stop please" this long after the question: the reply starts 2-4.5 s after it (the simulator's VAD and
# recogniser, slower on a busy machine) and runs 8-10 s, so the cut lands 1.5-4 s into it
BARGE_IN_AFTER_S = 6.0


def start_web_pipeline(procs: Procs, client: BusClient, sim_url: str | None, traces: Path,
                       stages: tuple[str, ...] = ("gateway", "logger"), gateway_args: tuple[str, ...] = ()) -> str:
    """Starts the stages and `voicebus web --port 0`; returns the page's URL."""
    env = {"VOICEBUS_SIM_URL": sim_url or "", "VOICEBUS_TRACE_DIR": str(traces)}
    for stage in stages:
        extra = ("--no-upload",) if stage == "logger" else gateway_args if stage == "gateway" else ()
        procs.voicebus(stage, *extra, env=env)
    web = procs.voicebus("web", "--port", "0", env=env)
    for stage in (*stages, "web"):
        client.wait_for(lambda m, s=stage: m.topic == f"health.{s}", timeout_s=30)
    if "gateway" in stages:
        client.wait_for(lambda m: m.topic == "rt.session.updated", timeout_s=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"serving url=(\S+)", procs.log_of(web))
        if match:
            return match.group(1)
        time.sleep(0.1)
    raise AssertionError(f"the web stage did not log its URL:\n{procs.log_of(web)}")


def page_recording(page: Chromium, name: str = "played", rate: int = 24_000) -> tuple[np.ndarray, float]:
    """What the page recorded (float samples at `rate`) and the wall time (ns) of its first sample."""
    samples, rate_in, t0_ns = page.recording(name)
    return resample_oneshot(samples.astype(np.float64) / 32768, rate_in, rate) * 32768, t0_ns


def dark_pixels(png: Path, rect: dict[str, float]) -> int:
    """Text-coloured pixels inside a CSS-pixel rectangle of a screenshot (device scale 1)."""
    import matplotlib.image

    image = matplotlib.image.imread(str(png))[..., :3]
    top, left = int(rect["top"]), int(rect["left"])
    crop = image[top:top + int(rect["height"]), left:left + int(rect["width"])]
    return int((crop.sum(axis=2) < 1.5).sum())


def where_the_browser_stopped(recording: np.ndarray, source: np.ndarray,
                              audio_end_ms: float) -> tuple[Followed, float, float]:
    """Place a reply cut at `audio_end_ms` in what the page played (24 kHz); asserts it is there, and returns
    (the placement, the reply's ms the page played until, the ms of the first loud part after that it did
    not play). A truncation at the played position lies between the two.

    Opus is a perceptual codec and the browser's jitter buffer may stretch time a little: chunk by chunk
    the waveform still correlates well enough to place the reply. A dropout earlier in the reply is neither
    where it stopped nor what it missed.
    """
    placed = follow(recording, source[:int(audio_end_ms) * 24], 24000)
    assert placed.clear_fraction(min_ncc=0.6) >= 0.8, placed.summary()
    blocks = 240  # 10 ms at 24 kHz
    offset = int(placed.recording_index(0))
    end = int(placed.recording_index(audio_end_ms * 24)) + 600 * 24
    loud = np.flatnonzero(np.abs(recording[offset:end]) > 300)
    heard_until_ms = placed.source_index(offset + loud[-1]) / 24 if loud.size else 0.0
    cut_by_ms = (end - offset) / 24
    for b in range(int(heard_until_ms * 24), len(source) - blocks, blocks):
        at = int(placed.recording_index(b))
        if np.abs(source[b:b + blocks]).max() > 3000 and np.abs(recording[at:at + blocks]).max(initial=0) < 300:
            cut_by_ms = b / 24
            break
    return placed, heard_until_ms, cut_by_ms
