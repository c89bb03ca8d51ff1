"""`voicebus eval` end to end: the shipped scenarios spoken through the real pipeline on the simulator,
checked, stored, reported and uploaded as a Weave Evaluation to the loopback trace server (once);
a broken tool fails by name and regresses against the first run; a stored conversation becomes a
scenario that passes; bad input is refused before anything is stored."""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from tests.helpers import net_audit, net_audit_env
from tests.support.trace_server import LoopbackTraceServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "evals"
pytestmark = pytest.mark.timeout(420)


def _empty_wav(rate: int = 24_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
    return out.getvalue()


EMPTY_WAV = _empty_wav()


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_", "WANDB_"))}
    env.update(XDG_DATA_HOME=str(home), PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def _eval(env: dict[str, str], *args: str, timeout: float = 360) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "services.cli", "eval", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:], result.stderr[-3000:])
    return result


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()) if root.exists() else []


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped scenarios, run once, uploaded to a loopback trace server as they finish."""
    home = tmp_path_factory.mktemp("eval-home")
    server = LoopbackTraceServer().start()
    audit_log = home / "net-audit.jsonl"
    env = _env(home, {**server.env(), **net_audit_env(audit_log, dict(os.environ))})
    result = _eval(env, str(EXAMPLES))
    runs = _runs(home / "voicebus" / "evals")
    yield {"result": result, "env": env, "home": home, "server": server, "runs": runs, "audit": audit_log}
    server.stop()


def test_shipped_scenarios_pass_offline_and_reach_weave_as_an_evaluation_once(shipped):
    result, server = shipped["result"], shipped["server"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(shipped["runs"]) == 1 and not any(p.name.startswith(".") for p in shipped["runs"])
    run_dir = shipped["runs"][0]
    run = json.loads((run_dir / "run.json").read_text())
    assert {s["name"] for s in run["scenarios"]} == {"time in tokyo, then paris", "weather needs no tool",
                                                      "barge in on a long reply", "barge in at the first words",
                                                      *TURN_TAKING}
    assert all(s["passed"] for s in run["scenarios"]) and run["summary"]["failed_checks"] == 0
    turns = {(s["name"], t["turn"]): t for s in run["scenarios"] for t in s["turns"]}
    tokyo = turns[("time in tokyo, then paris", 1)]
    assert [t["name"] for t in tokyo["tools"]] == ["get_current_time"] and not tokyo["tools"][0]["error"]
    arguments = tokyo["tools"][0]["arguments"]
    assert (json.loads(arguments) if isinstance(arguments, str) else arguments) == {"timezone": "Asia/Tokyo"}
    # the barge-in was checked against the player's own position, and the reply was really cut
    barge = {c["name"]: c for c in turns[("barge in on a long reply", 2)]["checks"]}
    cut = barge["truncated where played (within 60 ms)"]
    assert cut["passed"] and "the player had played" in cut["detail"] and cut["value"] <= 60
    first = turns[("barge in on a long reply", 1)]
    session = next(s["session"] for s in run["scenarios"] if s["name"] == "barge in on a long reply")
    stored = [json.loads(line) for line in (run_dir / "sessions" / session / "turns.jsonl").read_text().splitlines()]
    interrupted = next(t for t in stored if t["assistant"]["barge_in"])
    assert interrupted["assistant"]["played_ms"] < interrupted["assistant"]["generated_ms"]
    assert barge["kept transcript is what was heard (WER 0.5)"]["passed"]
    # timed from an event: spoken 300 ms after the reply's first words, so it is cut earlier in the reply
    early = {c["name"]: c for c in turns[("barge in at the first words", 2)]["checks"]}
    assert early["reply interrupted"]["passed"] and early["truncated where played (within 60 ms)"]["passed"]
    with wave.open(str(run_dir / first["audio"]["heard"])) as heard:  # the audio as heard: the cut reply
        assert abs(heard.getnframes() / 24 - interrupted["assistant"]["played_ms"]) <= 1
    # a report, with every turn's audio playable
    report = (run_dir / "report.html").read_text()
    assert report.count("<audio") == 2 * len(turns) and "barge in on a long reply" in report
    # the Evaluation on the trace server: one prediction per scenario, scores, the WAVs
    assert (json.loads((run_dir / "upload.json").read_text()))["confirmed"]
    ops = [c.get("op_name", "") for c in server.calls.values()]
    assert sum("Evaluation.evaluate" in op for op in ops) == 1
    assert sum("Evaluation.predict_and_score" in op for op in ops) == len(run["scenarios"])
    evaluate = next(c for c in server.calls.values() if "Evaluation.evaluate" in c.get("op_name", ""))
    assert evaluate.get("ended_at") and evaluate["output"]["passed"]["true_count"] == len(run["scenarios"])
    assert any("turn1_tool_get_current_time" in op for op in ops) and any("turn1_latency_ms" in op for op in ops)
    # timed as the run happened: the Evaluation spans the run, each prediction its scenario's conversation
    def at_ns(iso: str) -> int:
        return int(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)

    assert abs(at_ns(evaluate["started_at"]) - run["started_ns"]) <= 1e6
    assert abs(at_ns(evaluate["ended_at"]) - run["created_ns"]) <= 1e6
    windows = sorted((s["started_ns"], s["ended_ns"]) for s in run["scenarios"])
    predictions = sorted((at_ns(c["started_at"]), at_ns(c["ended_at"])) for c in server.calls.values()
                         if "Evaluation.predict_and_score" in c.get("op_name", ""))
    assert all(abs(a - b) <= 1e6 for pair in zip(predictions, windows, strict=True) for a, b in zip(*pair, strict=True))
    wavs = [f["data"] for f in server.files.values() if f.get("data", b"")[:4] == b"RIFF"]
    # every turn's user audio and reply as heard, byte for byte (the server keeps files by content: two
    # identical recordings, as the same question spoken twice can be, are one file)
    stored_wavs = {(run_dir / t["audio"][k]).read_bytes() for t in turns.values() for k in ("user", "heard")
                   if t["audio"].get(k)} - {EMPTY_WAV}  # a turn with no reply (a backchannel) heard nothing
    assert len(stored_wavs) >= len(turns) and stored_wavs <= set(wavs)
    with wave.open(io.BytesIO(wavs[0])) as uploaded:
        assert uploaded.getframerate() == 24000
    # a second upload sends nothing
    before = len(server.requests)
    again = subprocess.run([sys.executable, "-m", "services.cli", "upload", "--evals", "--root",
                            str(run_dir.parent)], cwd=REPO, env=shipped["env"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "nothing to upload" in again.stdout, again.stdout + again.stderr
    assert len(server.requests) == before
    # the whole eval (launcher, stages, simulator, its upload) looked up and reached loopback only
    audit = net_audit(shipped["audit"])
    assert audit["foreign"] == [] and audit["sentry"] == [] and audit["weave"], audit


def test_broken_tool_fails_by_name_and_a_stored_conversation_replays_as_a_passing_scenario(shipped, tmp_path):
    first = shipped["runs"][0]
    run = json.loads((first / "run.json").read_text())
    weather = next(s["session"] for s in run["scenarios"] if s["name"] == "weather needs no tool")
    scenario = tmp_path / "from-production.yaml"
    env = _env(shipped["home"])
    made = _eval(env, "--from-session", str(first / "sessions" / weather), "-o", str(scenario))
    assert made.returncode == 0 and scenario.exists()
    assert (tmp_path / "from-production-turn-1.wav").exists() and "no_tool: true" in scenario.read_text()
    # one run: the stored conversation replayed, and the tool scenarios with a clock that raises
    result = _eval(env, str(scenario), str(EXAMPLES / "tools.yaml"), "--tools", str(EXAMPLES / "broken_tools.py"),
                   "--baseline", str(first), "--no-upload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "called, but it failed: " in result.stdout and "the clock is broken" in result.stdout
    assert "REGRESSION time in tokyo, then paris turn 1: tool get_current_time" in result.stdout
    second = next(p for p in _runs(first.parent) if p != first)
    now = json.loads((second / "run.json").read_text())
    replayed = next(s for s in now["scenarios"] if s["file"] == str(scenario))
    assert replayed["passed"], replayed
    assert {c["name"] for c in replayed["turns"][0]["checks"]} >= {"no tool", "reply contains 'weather'"}
    regressions = now["baseline"]["regressions"]
    assert {r["check"] for r in regressions} >= {'tool get_current_time {"timezone": "Asia/Tokyo"}'}
    report = (second / "report.html").read_text()
    assert "class='regress'" in report and "regression(s)" in report
    assert os.path.relpath(first, second) in report  # the baseline's audio, playable beside this run's


def test_bad_input_gets_one_clear_error_and_nothing_is_stored(tmp_path):
    env = _env(tmp_path / "home")
    root = tmp_path / "home" / "voicebus" / "evals"
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hello\n       expect: {}\n")
    result = _eval(env, str(broken_yaml))
    assert result.returncode == 2 and f"{broken_yaml}:5: not valid YAML" in result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hello\n        expect:\n"
                    "          reply_contain: hi\n")
    result = _eval(env, str(typo))
    assert result.returncode == 2 and f"{typo}:6: scenarios[0].turns[0].expect.reply_contain: Extra inputs" \
        in result.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("scenarios:\n  - name: a\n    turns:\n      - wav: nowhere.wav\n")
    result = _eval(env, str(missing))
    assert result.returncode == 2 and "nowhere.wav" in result.stderr and "turn 1" in result.stderr
    down = _eval({**env, "VOICEBUS_SIM_URL": "http://127.0.0.1:9/v1"}, str(EXAMPLES / "tools.yaml"))
    assert down.returncode == 2 and "is down" in down.stderr and "nothing was run" in down.stderr
    unknown = tmp_path / "unknown-tool.yaml"
    unknown.write_text("scenarios:\n  - name: a\n    turns:\n      - say: what time is it\n        expect:\n"
                       "          tool: {name: get_weather}\n")
    result = _eval(env, str(unknown))
    assert result.returncode == 2 and "expects tool 'get_weather', which the tools stage does not offer" \
        in result.stderr and "get_current_time" in result.stderr
    assert _runs(root) == []  # nothing half-written, not even a staging folder


def test_online_a_judge_model_scores_the_turn_through_the_openai_sdk(simulator, tmp_path):
    """Online (a key set), `judge:` asks a chat model; here the simulator stands in for OpenAI, its
    reply rules playing the judge: PASS for one rubric, anything else (a FAIL) for the other."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([
        {"match": r"rubric\? the reply is about the weather", "reply": "PASS: it repeats the weather question."},
        {"match": r"rubric\?", "reply": "FAIL: it is in English."},
        {"match": ".*", "reply": "I heard: {transcript}"}]))
    sim = simulator("--rules", str(rules))
    scenario = tmp_path / "judged.yaml"
    scenario.write_text("scenarios:\n  - name: judged\n    turns:\n      - say: what is the weather like today\n"
                        "        expect:\n          judge: the reply is about the weather\n"
                        "      - say: what is the weather like tomorrow\n        expect:\n"
                        "          judge: the reply is in French\n")
    env = _env(tmp_path / "home", {"OPENAI_API_KEY": "sk-judge-test-key-never-printed", "OPENAI_BASE_URL": sim})
    result = _eval(env, str(scenario), "--no-upload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"online: {sim}" in result.stdout and "sk-judge-test" not in result.stdout + result.stderr
    run = json.loads(next((tmp_path / "home" / "voicebus" / "evals").glob("*/run.json")).read_text())
    judged = [next(c for c in t["checks"] if c["name"].startswith("judge:")) for t in run["scenarios"][0]["turns"]]
    assert [c["passed"] for c in judged] == [True, False]
    assert judged[0]["detail"].endswith("PASS: it repeats the weather question.")
    assert "x judge: the reply is in French: gpt-4o-mini: FAIL: it is in English." in result.stdout


STORY_RULES = [{"match": "story|dragon", "reply": "Once upon a time there was a little robot who lived in a quiet "
                "town by the sea and every morning it walked down to the harbour to count the boats."},
               {"match": "stop", "reply": "All right, I will stop."}, {"match": ".*", "reply": "I heard: {transcript}"}]
DRAGONS = ("  - name: dragons {n}\n    turns:\n      - say: tell me a story about dragons\n"
           "      - say: stop please\n        barge_in_ms: 1200\n        expect:\n          reply_contains: stop\n")
GREETING = "  - name: greeting\n    turns:\n      - say: hello there\n"


def test_a_barge_in_scenario_passes_first_second_and_alone_with_its_question_heard_whole(tmp_path):
    """The barge-in is spoken only once the reply to the whole question plays (never while the player still
    names an earlier scenario's reply), so its place in the file does not matter."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(STORY_RULES))
    mixed, alone = tmp_path / "mixed.yaml", tmp_path / "alone.yaml"
    mixed.write_text("scenarios:\n" + DRAGONS.format(n=1) + GREETING + DRAGONS.format(n=2))
    alone.write_text("scenarios:\n" + DRAGONS.format(n=3))
    env = _env(tmp_path / "home")
    for scenarios in (mixed, alone):
        result = _eval(env, str(scenarios), "--rules", str(rules), "--no-upload")
        assert result.returncode == 0, result.stdout + result.stderr
    sessions = [s for run in _runs(tmp_path / "home" / "voicebus" / "evals") for s in (run / "sessions").glob("*dragons*")]
    assert len(sessions) == 3
    for session in sessions:
        turns = [json.loads(line) for line in (session / "turns.jsonl").read_text().splitlines()]
        users = [turn["user"]["transcript"] for turn in sorted(turns, key=lambda t: t["turn"])]
        assert users == ["tell me a story about dragons", "stop please"], (session.name, users)


def test_a_phone_scenario_presses_keys_and_a_key_cuts_a_reply_where_the_carrier_had_played(tmp_path):
    """`eval --phone`: each scenario is a fake-carrier call into a phone stage (μ-law end to end); a `dtmf:`
    turn is told to the model as the caller's turn, and one pressed over a reply cuts it at the last mark
    the carrier echoed, checked as a spoken barge-in is."""
    env = _env(tmp_path / "home")
    result = _eval(env, "--phone", str(EXAMPLES / "phone"), "--no-upload")
    assert result.returncode == 0, result.stdout + result.stderr
    [run_dir] = _runs(tmp_path / "home" / "voicebus" / "evals")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["settings"]["phone"] and run["summary"]["failed_checks"] == 0
    turns = {(s["name"], t["turn"]): t for s in run["scenarios"] for t in s["turns"]}
    menu = turns[("the time by phone, then a key", 2)]
    assert menu["user_transcript"] == "The caller pressed 2 # on the phone keypad."
    assert "pressed 2" in menu["reply_heard"]
    keyed = {c["name"]: c for c in turns[("a key cuts a long reply", 2)]["checks"]}
    assert keyed["reply interrupted"]["passed"] and keyed["truncated where played (within 60 ms)"]["passed"]
    for scenario in run["scenarios"]:  # each call its own session, stored at the line's 8 kHz
        stored = [json.loads(line) for line in
                  (run_dir / "sessions" / scenario["session"] / "turns.jsonl").read_text().splitlines()]
        assert {t["audio_rate"] for t in stored} == {8000}
        assert [t["user"].get("keys") for t in stored][-1] in ("2#", "0")
    assert len({s["session"] for s in run["scenarios"]}) == 2


TURN_TAKING = {"a backchannel does not stop the story", "stop please still stops it",
               "eagerness low waits for the rest", "eagerness high answers the half", "asked whether anyone is there"}


def test_turn_taking_scenarios_backchannel_eagerness_and_idle_each_with_settings_of_its_own(shipped):
    """examples/evals/turn-taking.yaml (in the shipped run): each scenario's `settings:` are the gateway's for it
    alone. "yeah" over the story with false interruptions leaves it going (resumed, never cut, played out),
    "stop please" cuts it; semantic_vad low hears an unfinished phrase and its rest after 3 s as one turn, high
    as two (on the stored turns); 3 s of quiet gets the idle prompt, stored as the assistant's turn."""
    run_dir = shipped["runs"][0]
    run = json.loads((run_dir / "run.json").read_text())
    outcome = {s["name"]: s for s in run["scenarios"] if s["name"] in TURN_TAKING}
    assert all(s["passed"] for s in outcome.values()), shipped["result"].stdout
    checks = {c["name"]: c for c in outcome["a backchannel does not stop the story"]["turns"][1]["checks"]}
    assert checks["reply resumed"]["detail"].endswith("paused, resumed") and checks["reply not interrupted"]["passed"]

    def stored(name: str) -> list[dict]:
        lines = (run_dir / "sessions" / outcome[name]["session"] / "turns.jsonl").read_text().splitlines()
        return sorted(map(json.loads, lines), key=lambda t: t["turn"])

    low, high = stored("eagerness low waits for the rest"), stored("eagerness high answers the half")
    assert [t["user"]["transcript"] for t in low] == ["i would like a pizza and a large salad please"], low
    assert len(high) == 2 and high[0]["user"]["transcript"] == "i would like a pizza and", high
    assert high[0]["timing"]["speech_end_ns"] < high[1]["timing"]["speech_end_ns"]
    idle = stored("asked whether anyone is there")
    assert [t["assistant"]["transcript_heard"] for t in idle][-1] == "Are you still there?"
    assert not idle[-1]["user"]["transcript"] and idle[-1]["events"][0]["kind"] == "idle_prompt"


def test_a_backchannel_without_the_policy_is_cut_and_not_interrupted_says_so(tmp_path):
    """The same "yeah" in a scenario without false interruptions: the server's VAD cuts the story, and the
    expectation fails with what happened."""
    without = tmp_path / "without.yaml"
    without.write_text("scenarios:\n  - name: no policy\n    turns:\n      - say: please tell me a long story about "
                       "a little robot who lived in a quiet town by the sea\n      - say: yeah\n        barge_in_ms: "
                       "1000\n        expect: {not_interrupted: true}\n")
    result = _eval(_env(tmp_path / "home"), str(without), "--no-upload")
    assert result.returncode == 1, result.stdout + result.stderr
    [run_dir] = _runs(tmp_path / "home" / "voicebus" / "evals")
    run = json.loads((run_dir / "run.json").read_text())
    failed = {c["name"]: c for c in run["scenarios"][0]["turns"][1]["checks"]}
    assert failed["reply not interrupted"]["passed"] is False and failed["reply resumed"]["passed"] is False
    assert "x reply not interrupted: cut at" in result.stdout
