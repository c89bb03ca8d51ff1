"""The test clock (tests/clock.py): a zone moved to a chosen hour, seen by child processes' zoneinfo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.clock import offset_for_hour, zone_env
from tests.helpers import REPO

# instants around midnight, noon and the hours that once broke the spoken tool test
INSTANTS_UTC_S = [0, 59, 3599, 43_199, 43_200, 86_399, 1_764_620_040, 1_764_633_600 + 19 * 3600 + 34 * 60]


@pytest.mark.parametrize("now_s", INSTANTS_UTC_S)
def test_offset_puts_every_hour_at_half_past(now_s):
    for hour in range(24):
        offset = offset_for_hour(hour, now_s)
        assert -12 * 3600 <= offset <= 12 * 3600 and offset % 60 == 0
        local_s = (now_s + offset) % 86_400
        assert local_s // 3600 == hour and 29 * 60 <= local_s % 3600 <= 31 * 60, (hour, now_s, offset)


def test_offset_rejects_hours_outside_the_day():
    with pytest.raises(ValueError, match="not 0..23"):
        offset_for_hour(24, 0)


@pytest.mark.parametrize("hour", [0, 1, 2, 4, 13, 22, 23])
def test_a_child_process_and_the_example_tool_read_the_moved_hour(tmp_path, hour):
    env = zone_env(tmp_path / "zi", "Asia/Tokyo", hour)
    code = ("import json, sys; sys.path.insert(0, 'examples'); from tools import get_current_time; "
            "from datetime import datetime; from zoneinfo import ZoneInfo; "
            "print(json.dumps([get_current_time('Asia/Tokyo'), datetime.now(ZoneInfo('UTC')).utcoffset() is not None]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    tokyo, other_zones_found = json.loads(result.stdout)
    assert int(tokyo["datetime"][11:13]) == hour, tokyo
    assert other_zones_found  # zones not moved still come from the system's zoneinfo
