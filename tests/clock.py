"""A test-controlled clock for time-zone tools: "Asia/Tokyo" (or any zone) compiled by Debian's `zic`
to a fixed offset that puts its local time at the hour a test chooses.

zoneinfo reads `PYTHONTZPATH`, so the Python tool, the real `mcp-server-time` and the test all see
the same moved zone, while the wall clock (and with it the audio rig's timing) is untouched.
The hour is placed mid-way (HH:30) so a test has half an hour either side before it changes.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

SECONDS_PER_DAY = 86_400
SYSTEM_ZONEINFO = "/usr/share/zoneinfo"


def offset_for_hour(hour: int, now_utc_s: float) -> int:
    """Seconds east of UTC (whole minutes, within ±12 h) that make local time `hour`:30 at `now_utc_s`."""
    if not 0 <= hour <= 23:
        raise ValueError(f"hour {hour} is not 0..23")
    since_midnight = int(now_utc_s) % SECONDS_PER_DAY
    offset = (hour * 3600 + 1800 - since_midnight) % SECONDS_PER_DAY
    if offset > SECONDS_PER_DAY // 2:
        offset -= SECONDS_PER_DAY
    return offset // 60 * 60


def _zic_offset(offset_s: int) -> str:
    sign = "-" if offset_s < 0 else ""
    minutes = abs(offset_s) // 60
    return f"{sign}{minutes // 60}:{minutes % 60:02d}"


def zone_env(directory: Path, zone: str, hour: int, now_utc_s: float | None = None) -> dict[str, str]:
    """Compile `zone` at a fixed offset into `directory`; the environment that makes every process use it.

    Zones not compiled here are still found in the system's zoneinfo (PYTHONTZPATH lists it second).
    """
    zic = shutil.which("zic") or "/usr/sbin/zic"
    offset_s = offset_for_hour(hour, time.time() if now_utc_s is None else now_utc_s)
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "moved.zi"
    source.write_text(f"Zone {zone} {_zic_offset(offset_s)} - VBTEST\n")
    result = subprocess.run([zic, "-d", str(directory), str(source)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"zic could not compile {zone}: {result.stderr.strip()}")
    return {"PYTHONTZPATH": f"{directory}:{SYSTEM_ZONEINFO}"}
