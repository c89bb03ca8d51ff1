"""The CLI as a user meets it: --help, README's commands, the offline demo."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO

COMMANDS = ["bus", "capture", "demo", "doctor", "gateway", "inspect", "keys", "logger", "mic", "player", "replay",
            "report", "resample", "say", "simulate", "tap", "tools", "up", "upload", "web"]


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_every_command_with_one_line_help():
    result = _run("--help")
    assert result.returncode == 0
    section = result.stdout.split("Commands:", 1)[1]
    listed = dict(re.findall(r"^  (\w+)\s+(.+)$", section, re.MULTILINE))
    assert sorted(listed) == COMMANDS
    assert all(text.strip() and not text.endswith("...") for text in listed.values())
    for command in COMMANDS:
        assert _run(command, "--help").returncode == 0


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.strip() for line in quick.splitlines() if line.startswith("    ")]
    assert commands == ["bash scripts/setup.sh && .venv/bin/voicebus demo",
                        "bash scripts/setup.sh && .venv/bin/python -m pytest"]
    assert commands[1] in (REPO / ".ci/run").read_text()


def test_readme_documents_every_command_and_procfile_matches_launcher():
    readme = (REPO / "README.md").read_text()
    for command in COMMANDS:
        assert f"`voicebus {command}" in readme, command
    from services.pipeline import DEFAULT_STAGES, WEB_STAGES

    for name, stages in (("Procfile", DEFAULT_STAGES), ("Procfile.web", WEB_STAGES)):
        procfile = dict(line.split(":", 1) for line in (REPO / name).read_text().splitlines() if line.strip())
        assert set(procfile) == {"bus", "simulator", *stages}, name
        assert f"honcho -f {name} start" in readme or name == "Procfile"


def test_demo_runs_offline_and_prints_the_conversation(base_env, tmp_path):
    result = _run("demo", "--question", "what time does the train leave", "--question", "what time is it in tokyo",
                  "--out", str(tmp_path / "out"), "--root", str(tmp_path / "sessions"), env=base_env, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local simulator" in result.stdout
    assert "you said (as transcribed): 'what time does the train leave'" in result.stdout
    assert "assistant:                 'I heard: what time does the train leave'" in result.stdout
    assert re.search(r"first assistant audio played: \d+ ms", result.stdout)
    # the second question needs a tool: the demo shows the call and the answer spoken from its output
    assert re.search(r"tool call: +get_current_time -> .*Asia/Tokyo.*python:", result.stdout), result.stdout
    assert re.search(r"assistant: +'It is \d\d \d\d in Tokyo.'", result.stdout), result.stdout
    session_dir = next((tmp_path / "out").iterdir())
    assert (session_dir / "assistant-played.wav").stat().st_size > 48000
    assert (session_dir / "websocket.jsonl").stat().st_size > 0
    assert (session_dir / "report.html").exists()
    trace_dir = tmp_path / "sessions" / session_dir.name
    assert (trace_dir / "turns.jsonl").read_text().count("\n") == 2
