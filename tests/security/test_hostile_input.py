"""Hostile input that once cost a stage or the machine: refused, counted, and the stage goes on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from common.capture_file import MAGIC, RECORD_HEAD
from services.commands.evals.scenario import ScenarioError, load_scenarios
from tests.helpers import REPO

BILLION_LAUGHS = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["scenarios: [*a8]"])


def test_infinite_nan_and_oversized_page_messages_are_refused_counted_and_the_stage_goes_on(caplog):
    from services.stages.web.stage import WebStage

    caplog.set_level(logging.WARNING, logger="voicebus.web")
    stage = WebStage("127.0.0.1", 0)
    link = stage.link
    link._page_message(None, '{"type": "stats", "jitter_buffer_ms": 30, "output_latency_ms": 10, "rtt_ms": 4}')
    good = link.stats
    hostile = ['{"type": "stats", "jitter_buffer_ms": Infinity}', '{"type": "stats", "rtt_ms": NaN}',
               '{"type": "stats", "output_latency_ms": -Infinity}', '{"type": "stats", "rtt_ms": 1e308}',
               '{"type": "stats", "jitter_buffer_ms": "30"}', '{"type": "stats", "jitter_buffer_ms": -5}',
               "[" * 100_000 + "]" * 100_000, '{"type": "' + "x" * 10_000 + '"}', b"\x00binary",
               '{"type": "web.anything"}', "null"]
    for text in hostile:
        link._page_message(None, text)
    assert link.counts["bad_page_messages"] == len(hostile)
    assert link.stats == good  # nothing of them reached the stage's state
    # the reply's latency at the ear (where Infinity once raised OverflowError and ended the stage)
    assert stage.publish_state()["latency_ms"] == round(good.delay_ms, 1)
    # a flood is counted in full but logged once per interval (common.log.RateLimitedLog), not per message
    for _ in range(20_000):
        link._page_message(None, '{"type": "stats", "jitter_buffer_ms": Infinity}')
    assert link.counts["bad_page_messages"] == len(hostile) + 20_000
    lines = [r for r in caplog.records if "bad_page_message" in r.getMessage()]
    assert 1 <= len(lines) <= 5, len(lines)


def test_a_billion_laughs_scenario_file_is_refused_at_its_first_alias(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(ScenarioError) as refused:
        load_scenarios(path)
    # refused where the first alias stands (line 2), so nothing was ever expanded
    assert str(refused.value) == f"{path}:2: not valid YAML: aliases (*name) are not allowed in scenario files"
    big = tmp_path / "big.yaml"
    big.write_text("scenarios: []\n" + "# padding\n" * 200_000)
    with pytest.raises(ScenarioError, match="a scenario file is at most"):
        load_scenarios(big)


def _record(body: bytes) -> bytes:
    import zlib

    return RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body


def test_inspect_reports_records_that_are_not_frames_instead_of_crashing(tmp_path):
    from common.envelope import Stamper, encode

    good = encode(Stamper("test", "s").event("rt.session.created", {"event": {"type": "session.created"}}, 1))
    path = tmp_path / "odd.vbcap"
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(_record(msgpack.packb([1, [bytes(frame) for frame in good]], use_bin_type=True)))
        for odd in ([2, ["text, not bytes"]], [3, 42], ["soon", []], [4, [1, 2, 3]]):
            f.write(_record(msgpack.packb(odd, use_bin_type=True)))
        f.write(_record(msgpack.packb([5, [bytes(frame) for frame in good]], use_bin_type=True)))
    result = subprocess.run([sys.executable, "-m", "services.cli", "inspect", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rt.session.created" in result.stdout and "bad records: 4" in result.stdout, result.stdout


def test_a_run_dir_another_user_made_or_a_symlink_is_refused_with_a_clear_line(tmp_path, base_env):
    """/tmp/voicebus-$UID is a name anyone can take first. (The suite runs as root, as setup.sh does: it
    hands the directory to `nobody` to stand for the other user.)"""
    assert os.geteuid() == 0, "this test stands another user's directory up with chown: run the suite as root"
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 65534, 65534)
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    planted = tmp_path / "planted"
    planted.symlink_to(target)
    env = {k: v for k, v in base_env.items() if not k.startswith("VOICEBUS_BUS_")}
    for run_dir, said in ((foreign, "belongs to uid 65534, not to you"), (planted, "is a symlink")):
        result = subprocess.run([sys.executable, "-m", "services.cli", "bus"], cwd=REPO, capture_output=True,
                                text=True, timeout=60, env={**env, "VOICEBUS_RUN_DIR": str(run_dir)})
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no traceback
    assert (target.stat().st_mode & 0o777) == 0o755 and not list(target.iterdir())  # never chmod-ed, never used
    assert not list(foreign.iterdir())


def test_what_voicebus_stores_is_its_users_alone(simulator, tmp_path, base_env):
    root = tmp_path / "sessions"
    result = subprocess.run([sys.executable, "-m", "services.cli", "say", "a private question", "-o",
                             str(tmp_path / "answer.wav"), "--root", str(root), "--no-upload"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**base_env, "VOICEBUS_SIM_URL": simulator()})
    assert result.returncode == 0, result.stderr
    stored = [root, *root.rglob("*"), tmp_path / "answer.wav"]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in stored}
    assert all(mode in ("0o700", "0o600") for mode in modes.values()), modes
    assert Path(root / next(iter(os.listdir(root))) / "turns.jsonl").stat().st_mode & 0o077 == 0



def test_offer_limits_hold_per_address_and_forget_quiet_addresses(monkeypatch):
    from services.serving.serve import front

    clock = [1000.0]
    monkeypatch.setattr(front.time, "monotonic", lambda: clock[0])
    limits = front.ClientLimits(in_flight=2, per_minute=3)
    assert limits.admit("a") == 0 and limits.admit("a") == 0
    assert limits.admit("a") == 1  # a third at once: wait a second
    limits.done("a")
    assert limits.admit("a") == 0  # the third of the minute
    limits.done("a")
    limits.done("a")
    assert limits.admit("a") == 61  # the fourth in a minute: told when the first one leaves the window
    assert limits.admit("b") == 0  # another address has its own
    limits.done("b")
    for i in range(front.ClientLimits.MAX_TRACKED + 5):  # a flood spread over many addresses
        limits.admit(f"10.{i}")
        limits.done(f"10.{i}")
    clock[0] += 120  # a quiet minute later, they are forgotten at the next admission
    assert limits.admit("c") == 0 and len(limits.recent) == 1
