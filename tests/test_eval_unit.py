"""`voicebus eval`'s parts without a pipeline: scenario files and their errors, each check, the
baseline diff over repeats, scenarios from stored sessions, and the cued mic's timing."""

from __future__ import annotations

import json
import threading
import time
import wave
from pathlib import Path

import pytest

from common.envelope import Stamper
from common.wavio import write_wav
from services.commands.evals.checks import Interruption, check_turn
from services.commands.evals.command import compare
from services.commands.evals.from_session import reply_words, scenario_from_session
from services.commands.evals.run import match_turns
from services.commands.evals.scenario import ScenarioError, UserTurn, load_scenarios
from services.stages.logger.store import SessionStore
from services.stages.mic import CUE_STATE_TOPIC, CUE_TOPIC, CuedSource, MicStage


def _stored(reply: str = "It is 10 30 in Tokyo.", tools: list | None = None, latency: float | None = 900.0,
            user: str = "what time is it in tokyo", **assistant) -> dict:
    return {"turn": 1, "user": {"transcript": user},
            "assistant": {"transcript_heard": reply, "transcript_generated": reply, "played_ms": 2000.0,
                          "generated_ms": 2000.0, "barge_in": False, "item_id": "i1", **assistant},
            "tools": tools or [], "timing": {"speech_end_to_first_played_ms": latency}}


def _turn(**fields) -> UserTurn:
    return UserTurn.model_validate({"say": "what time is it in tokyo", **fields})


def test_scenario_errors_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hi\n        barge_in_ms: 300\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:2: scenarios\[0\]: .*first turn has no reply to barge in on"):
        load_scenarios(path)
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hi\n        wav: x.wav\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:4: scenarios\[0\].turns\[0\]: a turn speaks exactly one of"):
        load_scenarios(path)
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hi\n        expect:\n"
                    "          latency_ms: -5\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:6: .*expect.latency_ms: Input should be greater than 0"):
        load_scenarios(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:1: expected a mapping with `scenarios:`"):
        load_scenarios(path)
    path.write_text("name: one scenario\nturns:\n  - say: hello\n    expect: {reply_contains: hello}\n")
    parsed = load_scenarios(path)  # a file of one scenario needs no `scenarios:` list
    assert parsed.scenarios[0].turns[0].expect.reply_contains == ["hello"]


def test_each_expectation_is_checked_and_says_what_it_found():
    tool = {"name": "get_current_time", "arguments": '{"timezone": "Asia/Tokyo"}', "output": "{}", "error": None}
    turn = _turn(expect={"reply_matches": r"It is \d+ \d+ in Tokyo", "reply_contains": "tokyo",
                         "reply_not_contains": "sorry", "tool": {"name": "get_current_time",
                                                                  "arguments": {"timezone": "Asia/Tokyo"}},
                         "transcript_wer": 0.2, "latency_ms": 1000})
    checks = check_turn(turn, _stored(tools=[tool]))
    assert all(c.passed for c in checks), checks
    failed = {c.name: c for c in check_turn(turn, _stored(reply="Sorry, no.", tools=[{**tool, "error": "boom"}],
                                                          latency=1500.0, user="what dime is in tokyo"))
              if c.passed is False}
    assert failed['tool get_current_time {"timezone": "Asia/Tokyo"}'].detail == "called, but it failed: boom"
    assert set(failed) == {"reply matches /It is \\d+ \\d+ in Tokyo/", "reply contains 'tokyo'",
                           "reply does not contain 'sorry'", 'tool get_current_time {"timezone": "Asia/Tokyo"}',
                           "transcript within WER 0.2", "reply within 1000 ms"}
    assert failed["transcript within WER 0.2"].value == pytest.approx(2 / 6, abs=0.001)  # time->dime, "it" lost
    other = check_turn(_turn(expect={"tool": {"name": "get_current_time", "arguments": {"timezone": "UTC"}}}),
                       _stored(tools=[tool]))
    assert "called with other arguments" in other[-1].detail and other[-1].passed is False
    assert check_turn(turn, None)[0].passed is False  # no turn heard: one failing check, not a crash
    judged = check_turn(_turn(expect={"judge": "gives the time"}), _stored())
    assert judged[-1].passed is None and "offline" in judged[-1].detail  # never counted as passing


def test_barge_in_is_checked_against_the_players_position_and_the_audio_as_played():
    turn = _turn(say="stop please", barge_in_ms=800, expect={"truncation_tolerance_ms": 40})
    cut = _stored(reply="I heard: please tell", barge_in=True, played_ms=1380.0,
                  transcript_generated="I heard: please tell me a long story")
    good = check_turn(turn, _stored(user="stop please"), Interruption(cut, 1370.0, "i heard please tell"))
    assert all(c.passed for c in good), good
    late = {c.name: c for c in check_turn(turn, _stored(user="stop please"),
                                          Interruption(cut, 1300.0, "i heard please tell me a long story"))}
    assert late["truncated where played (within 40 ms)"].passed is False
    assert late["truncated where played (within 40 ms)"].value == 80.0
    assert late["kept transcript is what was heard (WER 0.5)"].passed is False
    not_cut = check_turn(turn, _stored(user="stop please"), Interruption(_stored(), None, None))
    assert [c.name for c in not_cut if c.passed is False] == ["reply interrupted"]


def test_stored_turns_are_matched_to_cues_by_when_the_speech_ended():
    cues = [{"started": 100, "ended": 200}, {"started": 1000, "ended": 1100}, {"started": 5000, "ended": 5100}]
    stored = [{"turn": 1, "timing": {"speech_end_ns": 250}}, {"turn": 2, "timing": {"speech_end_ns": 1150}},
              {"turn": 3, "timing": {"speech_end_ns": 1400}}]  # the server split the second one in two
    assert [t and t["turn"] for t in match_turns(stored, cues)] == [1, 3, None]


def _run(outcomes: list[bool], latency: float) -> dict:
    return {"scenarios": [{"file": "x/tools.yaml", "name": "tokyo", "repeat": k + 1, "turns": [
        {"turn": 1, "latency_ms": latency, "checks": [{"name": "tool", "passed": ok}, {"name": "judge", "passed": None}]}]}
        for k, ok in enumerate(outcomes)]}


def test_baseline_diff_compares_pass_rates_over_repeats():
    diff = compare(_run([True, True, True], 1000), _run([True, False, True], 1300), "base")
    assert diff["regressions"] == [{"file": "tools.yaml", "scenario": "tokyo", "turn": 1, "check": "tool",
                                    "before": 1.0, "now": 0.667}]
    assert diff["latency"][0]["delta_ms"] == 300 and not diff["fixed"]
    assert compare(_run([False, True], 1000), _run([True, True], 1000), "base")["fixed"][0]["now"] == 1.0


def test_a_stored_session_becomes_a_scenario_with_its_audio_beside_it(tmp_path):
    store = SessionStore(tmp_path / "sessions", "s1")
    turn = {"key": "r1", "user": {"transcript": "what time is it in tokyo", "audio_ms": 1000.0},
            "assistant": {"transcript_heard": "It is 10 30 in Tokyo.", "barge_in": False},
            "tools": [{"name": "get_current_time", "arguments": '{"timezone": "Asia/Tokyo"}', "error": None}]}
    store.write_turn(turn, {"user": b"\x01\x00" * 24000, "assistant-played": b""})
    out = scenario_from_session(store.dir, tmp_path / "regress" / "tokyo.yaml")
    parsed = load_scenarios(out)
    written = parsed.scenarios[0].turns[0]
    assert (out.parent / written.wav).stat().st_size == 44 + 48000
    assert written.expect.tool[0].arguments == {"timezone": "Asia/Tokyo"} and written.expect.tool[0].ok
    assert written.expect.reply_contains == ["Tokyo"] and written.expect.transcript == "what time is it in tokyo"
    assert reply_words("It is 07 41 in Tokyo.") == ["Tokyo"]  # digits change from run to run: never expected
    with pytest.raises(ValueError, match="no stored turn with user audio"):
        scenario_from_session(tmp_path / "sessions" / "empty", tmp_path / "x.yaml")


def test_cued_mic_speaks_a_wav_within_a_frame_of_its_cue_and_refuses_a_bad_one(tmp_path):
    wav = write_wav(tmp_path / "cue.wav", (b"\x00\x10" * 2400), 24000)  # 100 ms at 24 kHz, resampled to 48
    stage = MicStage(CuedSource(48000, 20))
    frames, told = [], []
    lock = threading.Lock()

    def put(frame):
        with lock:
            frames.append((time.time_ns(), frame))

    stage.source.start(put, notify=told.append)
    try:
        time.sleep(0.1)
        stage.handle(Stamper("eval", "s").event(CUE_TOPIC, {"cue": "c1", "path": str(wav)}, time.time_ns()))
        queued_ns = time.time_ns()
        stage.handle(Stamper("eval", "s").event(CUE_TOPIC, {"cue": "c2", "path": str(tmp_path / "none.wav")}, 0))
        time.sleep(0.3)
    finally:
        stage.source.stop()
    with lock:
        loud = [(t, f) for t, f in frames if any(f.pcm)]
    assert len(loud) == 5 and all(len(f.pcm) == 1920 for _, f in loud)  # 100 ms = five 20 ms frames at 48 kHz
    assert any(next(f for t, f in frames if t > queued_ns).pcm)  # the very next frame after the cue speaks
    states = [(t["cue"], t["state"]) for t in told]
    assert states == [("c1", "started"), ("c1", "ended")]
    assert told[1]["t_capture_ns"] - told[0]["t_capture_ns"] == 100_000_000  # on the sample clock, not the wakeups
    assert [f.t_capture_ns - frames[0][1].t_capture_ns for _, f in frames[:3]] == [0, 20_000_000, 40_000_000]
    refused = json.loads(json.dumps(stage.counters()["cues"]))
    assert refused == {"queued": 1, "refused": 1}
    assert stage.subscriptions == [CUE_TOPIC] and CUE_STATE_TOPIC == "mic.cue"


def test_a_capture_turn_speaks_the_captured_user_audio_between_from_and_to(tmp_path):
    from common.capture_file import CaptureWriter
    from common.envelope import encode
    from common.stage import Output
    from services.commands.evals.scenario import resolve_audio

    out, sent = Output.collecting("resample", "s")
    for index in range(50):  # one second of 20 ms frames at 24 kHz, each frame's samples = its index
        out.audio("audio.user", int(index).to_bytes(2, "little") * 480, rate=24000, channels=1, pts=index * 480,
                  t_capture_ns=index * 20_000_000)
    writer = CaptureWriter(tmp_path / "turn.vbcap")
    for message in sent:
        writer.write(0, [bytes(f) for f in encode(message)])
    writer.close()
    scenario = tmp_path / "s.yaml"
    scenario.write_text("scenarios:\n  - name: a\n    turns:\n      - capture: turn.vbcap\n        from_s: 0.2\n"
                        "        to_s: 0.5\n")
    turn = load_scenarios(scenario).scenarios[0].turns[0]
    wav = resolve_audio(turn, scenario, tmp_path, tmp_path)
    with wave.open(str(wav)) as cut:
        samples = cut.readframes(cut.getnframes())
    assert len(samples) == 2 * int(0.3 * 24000)
    assert samples[:2] == (10).to_bytes(2, "little") and samples[-2:] == (24).to_bytes(2, "little")
    turn = turn.model_copy(update={"from_s": 5.0, "to_s": None})
    with pytest.raises(ScenarioError, match="from_s 5.0 is past its 1.0 s of audio.user"):
        resolve_audio(turn, scenario, tmp_path, tmp_path)


def test_a_stored_conversation_that_called_a_tool_becomes_a_scenario_with_that_call(tmp_path):
    """The store keeps a call's arguments parsed (a dict): --from-session once failed on them (TypeError)."""
    import yaml

    from services.commands.evals.from_session import scenario_from_session
    from services.commands.evals.scenario import load_scenarios

    session = Path(__file__).parent / "data" / "stored-session"
    out = scenario_from_session(session, tmp_path / "replay.yaml")
    [scenario] = yaml.safe_load(out.read_text())["scenarios"]
    first = scenario["turns"][0]["expect"]
    assert first["tool"] == [{"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}, "ok": True}]
    assert "no_tool" in scenario["turns"][1]["expect"]
    assert (tmp_path / "replay-turn-1.wav").is_file()
    load_scenarios(out)  # and it is a valid scenario file


def test_baseline_latest_is_the_latest_run_of_the_same_scenario_files(tmp_path):
    """Once `latest` took the latest run of any file (a failing run of another file: 0 regressions)."""
    from services.commands.evals.command import EvalError, find_run

    good, other = tmp_path / "good.yaml", tmp_path / "other.yaml"
    root = tmp_path / "runs"
    for run_id, files, failed in (("e0", [good, other], 0), ("e1", [good], 0), ("e2", [good], 2),
                                  ("e3", [other], 1)):
        (root / run_id).mkdir(parents=True)
        (root / run_id / "run.json").write_text(json.dumps({"run": run_id, "files": [str(f) for f in files],
                                                             "summary": {"failed_checks": failed}}))
    assert find_run(root, "latest", [good]).name == "e2"  # not e3, a later run of another file
    assert find_run(root, "latest-passing", [good]).name == "e1"
    assert find_run(root, "latest", [other]).name == "e3"
    assert find_run(root, "latest-passing", [other]).name == "e0"  # a run of both files ran it too
    with pytest.raises(EvalError, match="no passing run of new.yaml"):
        find_run(root, "latest-passing", [tmp_path / "new.yaml"])


def test_repeats_whose_checks_all_held_say_so_instead_of_an_empty_heading(capsys):
    from services.commands.evals.command import print_table

    def run(outcomes: list[bool]) -> dict:
        scenarios = [{"file": "a.yaml", "name": "greeting", "repeat": index + 1, "passed": held,
                      "turns": [{"turn": 1, "latency_ms": 900.0, "reply_heard": "hello", "passed": held,
                                 "checks": [{"name": "reply_contains", "passed": held, "detail": "hello"}]}]}
                     for index, held in enumerate(outcomes)]
        return {"settings": {"repeat": len(outcomes)}, "scenarios": scenarios,
                "summary": {"passed": sum(outcomes), "scenarios": len(outcomes), "checks": len(outcomes),
                            "failed_checks": outcomes.count(False), "not_run": 0}}

    print_table(run([True, True]))
    out = capsys.readouterr().out
    assert "every check held in all 2 repeats" in out and "did not always hold" not in out
    print_table(run([True, False]))
    out = capsys.readouterr().out
    assert "did not always hold" in out and "greeting turn 1: reply_contains: 1/2" in out


def test_a_keys_turn_is_a_phone_turn_with_nothing_to_transcribe(tmp_path):
    from services.commands.evals.run import Settings, plan

    path = tmp_path / "keys.yaml"
    path.write_text("scenarios:\n  - name: menu\n    turns:\n      - say: hello\n      - dtmf: '1#'\n"
                    "        expect: {reply_contains: pressed 1, transcript_wer: 0.3}\n")
    turn = load_scenarios(path).scenarios[0].turns[1]
    assert turn.dtmf == "1#" and turn.expected_words is None  # no words to hold a transcript to
    with pytest.raises(ScenarioError, match=r"turn 2: presses keys \(dtmf\), which only a phone line carries: run "
                                            r"`voicebus eval --phone`"):
        plan([path], tmp_path, Settings())
    planned = plan([path], tmp_path, Settings(phone=True))
    assert planned[0].audio[1] is None and planned[0].audio[0].is_file()
    stored = _stored(reply="I heard: The caller pressed 1 # on the phone keypad.",
                     user="The caller pressed 1 # on the phone keypad.")
    checks = check_turn(turn, stored)
    assert [c.name for c in checks] == ["turn heard", "reply contains 'pressed 1'"] and all(c.passed for c in checks)
    for bad in ("'12x'", "''", "{say: hi}"):
        path.write_text(f"scenarios:\n  - name: m\n    turns:\n      - say: hi\n      - dtmf: {bad}\n")
        with pytest.raises(ScenarioError, match=r"keys.yaml:5: scenarios\[0\].turns\[1\]"):
            load_scenarios(path)
    path.write_text("scenarios:\n  - name: m\n    turns:\n      - say: hi\n      - say: stop\n"
                    "        barge_in_after: rt.response.created\n")
    with pytest.raises(ScenarioError, match="over the phone a barge-in is timed by what the caller has heard"):
        plan([path], tmp_path, Settings(phone=True))


def test_scenario_settings_and_not_interrupted_are_checked_before_anything_runs(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: a\n    settings: {false_interruptions: true, eagerness: low}\n"
                    "    turns:\n      - say: hi\n      - say: yeah\n        barge_in_ms: 900\n"
                    "        expect: {not_interrupted: true}\n")
    scenario = load_scenarios(path).scenarios[0]
    assert scenario.settings.overrides() == {"false_interruptions": True, "eagerness": "low"}
    path.write_text("scenarios:\n  - name: a\n    settings: {audio_format: pcmu}\n    turns:\n      - say: hi\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:3: scenarios\[0\].settings.audio_format: Extra inputs"):
        load_scenarios(path)
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hi\n      - say: yeah\n"
                    "        expect: {not_interrupted: true}\n")
    with pytest.raises(ScenarioError, match="turn 2: not_interrupted is about a reply spoken over: give barge_in_ms"):
        load_scenarios(path)


def test_pauses_within_a_turn_and_quiet_turns_are_checked_before_anything_runs(tmp_path):
    from services.commands.evals.checks import check_turn as check

    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: [i would like a pizza and, 3, a salad]\n"
                    "        expect: {user_turns: 1}\n      - wait_s: 5\n        expect: {idle_prompt: true}\n")
    first, quiet = load_scenarios(path).scenarios[0].turns
    assert first.expected_words == "i would like a pizza and a salad"
    assert first.speech_parts() == [("say", "i would like a pizza and"), ("silence", 3.0), ("say", "a salad")]
    checks = check(first, _stored(user="i would like a pizza and a salad"), user_turns=2)
    assert [(c.name, c.passed) for c in checks if c.name.startswith("heard as")] == [("heard as 1 turn", False)]
    prompt = _stored(reply="Are you still there?", user="")
    assert [c.passed for c in check(quiet, {**prompt, "events": [{"kind": "idle_prompt"}]})] == [True]
    assert [c.passed for c in check(quiet, None)] == [False]  # nothing was said into the quiet
    for bad, why in (("[3]", "needs words"), ("[hi, 40]", "at most 30")):
        path.write_text(f"scenarios:\n  - name: a\n    turns:\n      - say: {bad}\n")
        with pytest.raises(ScenarioError, match=why):
            load_scenarios(path)
    path.write_text("scenarios:\n  - name: a\n    turns:\n      - say: hi\n        expect: {idle_prompt: true}\n")
    with pytest.raises(ScenarioError, match="idle_prompt is what a quiet turn gets: give wait_s"):
        load_scenarios(path)
