"""The soak, shortened: scripts/soak.py for 1 minute of looping spoken conversation under `voicebus up`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.audio
@pytest.mark.timeout(420)
def test_one_minute_soak_stores_and_uploads_every_turn_exactly_once(tmp_path, base_env):
    result = subprocess.run([sys.executable, "scripts/soak.py", "--minutes", "1", "--interval-s", "15", "--out",
                             str(tmp_path)], cwd=REPO, env=base_env, capture_output=True, text=True, timeout=400)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert all(ok for _, ok, _ in report["checks"]) and len(report["checks"]) >= 5
    assert len(report["samples"]) >= 4  # one every 15 s
    assert report["turns_stored"] >= 5 and report["barge_ins"] >= 1
    assert report["turn_calls_uploaded"] == report["turns_stored"] and report["calls_resent"] == 0
    every_stage = {"bus", "mic", "resample", "gateway", "player", "logger"}
    assert every_stage <= set(report["samples"][-1]["rss_mb"]) and every_stage <= set(report["samples"][-1]["cpu_pct"])
