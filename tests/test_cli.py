"""The CLI as a user meets it: --help, README's commands, the offline demo."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO

COMMANDS = ["bus", "call", "capture", "demo", "doctor", "eval", "gateway", "inspect", "keys", "logger", "mic", "phone", "player", "replay",
            "report", "resample", "say", "serve", "simulate", "tap", "tools", "up", "upload", "web"]


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
    # a whole sentence each: click cuts at the first period, as after "e.g." (it once left "(e.g.")
    assert all(text.count("(") == text.count(")") for text in listed.values()), listed
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
    from services.pipeline import DEFAULT_STAGES, PHONE_STAGES, WEB_STAGES

    for name, stages in (("Procfile", DEFAULT_STAGES), ("Procfile.web", WEB_STAGES), ("Procfile.phone", PHONE_STAGES)):
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


def test_demo_shows_your_own_tool_with_your_rules(base_env, tmp_path):
    tools = tmp_path / "my_tools.py"
    tools.write_text('def lucky_number(name: str = "you") -> dict:\n    """A lucky number."""\n'
                     '    return {"number": 7, "name": name}\n')
    rules = tmp_path / "rules.json"
    rules.write_text('[{"match": "lucky", "call": {"name": "lucky_number", "arguments": {}}, '
                     '"after_call": "Your lucky number is {number}."}]')
    result = _run("demo", "--question", "what is my lucky number", "--tools", str(tools), "--rules", str(rules),
                  "--out", str(tmp_path / "out"), "--root", str(tmp_path / "sessions"), env=base_env, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'tool call: +lucky_number -> \{"number": 7, "name": "you"\}', result.stdout), result.stdout
    assert "assistant:                 'Your lucky number is 7.'" in result.stdout
    helped = _run("demo", "--help").stdout
    assert "the weather, the time in Tokyo, a short story" in helped and "--tools" in helped and "--rules" in helped


def test_say_works_offline_and_never_leaves_a_broken_file(base_env, tmp_path):
    from common.ports import free_port
    from common.wavio import read_wav

    answer = tmp_path / "answer.wav"
    offline = {**base_env, "VOICEBUS_SIM_PORT": str(free_port())}  # nothing listens: say starts the simulator
    result = _run("say", "hello there", "-o", str(answer), "--root", str(tmp_path / "sessions"), env=offline,
                  timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local simulator" in result.stderr and "I heard: hello there" in result.stdout
    wav = read_wav(answer)
    assert wav.rate == 24000 and len(wav.pcm) > 24000
    # a target that does not answer: a clear error, and no answer.wav, whole or partial
    broken = tmp_path / "broken.wav"
    down = {**base_env, "VOICEBUS_SIM_URL": f"http://127.0.0.1:{free_port()}/v1"}
    result = _run("say", "hello", "-o", str(broken), "--root", str(tmp_path / "sessions"), env=down, timeout=90)
    assert result.returncode == 1 and "cannot reach" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.wav", "sessions"]


def test_without_a_bus_tools_that_need_one_say_so_and_fail(base_env, tmp_path):
    from common.capture_file import CaptureWriter
    from common.envelope import Stamper, encode

    for args in (["tap", "--duration", "3"], ["capture", "-o", str(tmp_path / "c.vbcap")]):
        result = _run(*args, env=base_env, timeout=30)
        assert result.returncode != 0 and "no bus answers at" in result.stderr and "voicebus up" in result.stderr, \
            (args, result.stdout, result.stderr)
    assert not (tmp_path / "c.vbcap").exists()  # no empty capture left behind
    capture = tmp_path / "one.vbcap"
    writer = CaptureWriter(str(capture))
    writer.write(1, encode(Stamper("test", "s").event("demo.x", {}, 1)))
    writer.close()
    result = _run("replay", str(capture), env=base_env, timeout=30)
    assert result.returncode == 1 and "no bus answers at" in result.stderr, result.stderr
    broken = tmp_path / "broken_tools.py"
    broken.write_text("def broken(:\n")
    result = _run("tools", "--module", str(broken), env=base_env, timeout=30)  # before waiting for any bus
    assert result.returncode == 2 and "cannot load tools from" in result.stderr and "SyntaxError" in result.stderr


def test_doctor_judges_a_browser_pipeline_without_sound_devices(procs, client_factory, base_env):
    procs.voicebus("web", "--port", "0")
    client = client_factory(["health.web"])
    client.wait_for(lambda m: m.topic == "health.web", timeout_s=30)
    no_sound = {k: v for k, v in base_env.items() if k not in ("PULSE_SERVER", "PULSE_RUNTIME_PATH")}
    result = _run("doctor", env={**no_sound, "XDG_RUNTIME_DIR": str(procs.log_dir)})
    assert result.returncode == 0, result.stdout
    assert "audio devices: not needed (the web stage serves a browser" in result.stdout
    assert "stage web:" in result.stdout


def test_call_dial_at_is_ready_first_and_offers_at_that_moment(tmp_path):
    """`voicebus call --dial-at T` (what bench_serve's callers do) sends its offer at T, not when it
    starts: an endpoint that is full (503) sees the offer no earlier than T, and the caller exits 3."""
    import asyncio
    import threading
    import time

    from aiohttp import web

    offered_at: list[float] = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def offer(_request: web.Request) -> web.Response:
        offered_at.append(time.time())
        return web.json_response({"error": "all lines are busy"}, status=503, headers={"Retry-After": "1"})

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/offer", offer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    port = runner_box[0].addresses[0][1]
    try:
        dial_at = time.time() + 6.0  # well past the caller's start-up (imports, flite): it waits for it
        result = _run("call", f"http://127.0.0.1:{port}", "--say", "hello", "--dial-at", f"{dial_at:.3f}", timeout=60)
        assert result.returncode == 3, result.stderr
        assert "all lines are busy" in result.stderr
        assert len(offered_at) == 1 and offered_at[0] >= dial_at, (offered_at, dial_at)  # not before it
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
