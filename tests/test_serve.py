"""`voicebus serve` on a local multi-node Ray cluster (ray.cluster_utils: a head and two nodes of two
slots each, one machine): real callers (`voicebus call`, aiortc) over real WebRTC, one stage set each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common.config import BusConfig
from common.processes import command_words
from common.speech import Transcriber, nearest_sentence, word_error_rate
from common.utterances import compose
from common.wavio import read_wav, write_wav
from services.pipeline import WEB_STAGES
from services.stages.logger.store import load_turns
from tests.helpers import REPO, BusClient, alive, children_of
from tests.support.browser import Chromium
from tests.web import BARGE_IN_AFTER_S, page_recording, where_the_browser_stopped

QUESTIONS = ["what is the weather like today", "please turn on the lights in the kitchen",
             "how far away is the moon", "can you help me with my homework"]
# the four callers: the last asks for the time, which the simulator answers with a tool call
FOUR_QUESTIONS = [*QUESTIONS[:3], "what time is it in tokyo"]
SLOW_START_S = 8  # a stage set's start in the prewarming test: longer than a caller's own start
SLOTS_PER_NODE, NODES = 2, 2
pytestmark = pytest.mark.timeout(300)  # a cluster, several stage sets and real calls per test


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [_add_node(made) for _ in range(NODES)]
    made.wait_for_nodes()
    yield made, nodes
    made.shutdown()


def _add_node(made):
    return made.add_node(num_cpus=1, resources={"conversation": SLOTS_PER_NODE})


@pytest.fixture
def cluster(ray_cluster):
    """The module's cluster with all its nodes: one a test took away (lost, drained, or left behind by a
    failure) is replaced before the next test, so one failure is not every test after it failing too."""
    made, nodes = ray_cluster
    for node in list(nodes):
        raylets = node.all_processes.get("raylet", [])
        if node not in made.worker_nodes or any(raylet.process.poll() is not None for raylet in raylets):
            if node in made.worker_nodes:
                made.remove_node(node, allow_graceful=False)
            nodes.remove(node)
    if len(nodes) < NODES:
        nodes.extend(_add_node(made) for _ in range(NODES - len(nodes)))
        made.wait_for_nodes()
    return made, nodes


OPERATOR_TOKEN = "test-serve-operator-token-0123456789"  # the serve each test starts takes it from its env


def _http(url: str, body: bytes | None = None) -> tuple[int, str, dict]:
    """A request as the operator makes it (the token is only needed by /status and /drain)."""
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}", **({"Content-Type": "application/json"} if body else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def _status(url: str) -> dict:
    return json.loads(_http(url + "status?format=json")[1])


def _ended(url: str, session: str, within_s: float = 3.0) -> dict:
    """The /status record of a call that hung up: reaped within a round (0.5 s), a stop, and a bit."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = [e for e in _status(url)["ended"] if e["session"] == session]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"{session} was not ended within {within_s} s: {_status(url)}")


def _wait_prewarmed(url: str, count: int, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and _status(url)["prewarmed"] < count:
        time.sleep(0.2)
    assert _status(url)["prewarmed"] == count, _status(url)


def _start_serve(procs, cluster_address: str, traces, *extra: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    serve = procs.voicebus("serve", "--ray-address", cluster_address, "--node-host", "127.0.0.1", "--port", "0",
                           "--root", str(traces), "--idle-timeout", "60", "--client-offers", "16/600", *extra,
                           env={"VOICEBUS_OPERATOR_TOKEN": OPERATOR_TOKEN, **(env or {})})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        match = re.search(r"serving url=(\S+)", procs.log_of(serve))
        if match:
            return serve, match.group(1)
        assert serve.poll() is None, procs.log_of(serve)
        time.sleep(0.2)
    raise AssertionError(f"serve did not start:\n{procs.log_of(serve)}")


class _BusTap(threading.Thread):
    """Everything on one conversation's bus (all topics), from now until `stop()`."""

    def __init__(self, session: str, bus: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.session = session
        self.client = BusClient(BusConfig(pub=bus["pub"], sub=bus["sub"]), [""])
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.client.collect(0.2)

    def stop(self) -> list:
        self.done.set()
        self.join(timeout=5)
        self.client.close()
        return self.client.seen


def _call(procs, url: str, question: str, tmp_path, name: str) -> subprocess.Popen:
    return procs.voicebus("call", url, "--say", question, "--json", "--timeout", "90", "--record",
                          str(tmp_path / f"{name}.wav"), stdout=subprocess.PIPE, name=name)


def test_four_callers_at_once_each_hear_their_own_answer_in_a_stage_set_of_their_own(procs, cluster, tmp_path):
    made, _nodes = cluster
    traces = tmp_path / "traces"
    # every slot prewarmed: the callers talk to stage sets that run, not to ones still starting beside
    # them (the starts are what 2 cores cannot also do in real time; bench_serve measures that)
    serve, url = _start_serve(procs, made.address, traces, "--prewarm", str(SLOTS_PER_NODE * NODES))
    _wait_prewarmed(url, SLOTS_PER_NODE * NODES)
    callers = [_call(procs, url, question, tmp_path, f"caller-{i}") for i, question in enumerate(FOUR_QUESTIONS)]
    # every slot is taken while they talk: the next caller hears so at once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(now := _status(url)["conversations"]) < len(FOUR_QUESTIONS)
                                           or not all(c.get("stage_pids") for c in now)):
        time.sleep(0.2)
    placed = _status(url)
    assert len(placed["conversations"]) == 4, placed
    # each conversation's own bus, watched from the moment it is placed: nothing of another gets on it
    taps = [_BusTap(c["session"], c["bus"]) for c in placed["conversations"]]
    assert sorted(n["used"] for n in placed["nodes"]) == [SLOTS_PER_NODE] * NODES  # Ray spread them, 2 and 2
    # one host process a node runs its conversations (not one Ray worker each), each set its own processes
    hosts = {c["node_id"]: set() for c in placed["conversations"]}
    for c in placed["conversations"]:
        hosts[c["node_id"]].add(c["pid"])
    assert [len(pids) for pids in hosts.values()] == [1] * NODES, hosts
    stage_pids = [pid for c in placed["conversations"] for pid in c["stage_pids"].values()]
    assert len(stage_pids) == len(set(stage_pids)) == 4 * (len(WEB_STAGES) + 1), placed["conversations"]
    # the operator's view: each node's load as its stage sets report it, each conversation's CPU
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(c.get("cpu_pct") for c in _status(url)["conversations"]):
        time.sleep(0.2)
    loaded = _status(url)
    assert all(c["cpu_pct"] > 0 for c in loaded["conversations"]), loaded
    assert all(n["load_1m"] is not None and n["cpus"] and n["conversations_cpu_pct"] > 0 for n in loaded["nodes"]), \
        loaded
    page = _http(url + "status?format=html")[1]
    assert "conversations cpu pct" in page and "<th>counter</th>" in page and "counts: {" not in page
    # a node's 56-digit id is shown by its first 12 (what `serve drain` takes), the whole on hover
    node_id = loaded["nodes"][0]["node_id"]
    assert f"<td title='{node_id}'><code>{node_id[:12]}</code></td>" in page and f">{node_id}<" not in page
    refused = procs.voicebus("call", url, "--say", "hello", name="caller-refused")
    assert refused.wait(timeout=30) == 3 and "all lines are busy" in procs.log_of(refused)
    status, page, headers = _http(url)
    assert status == 503 and "All lines are busy" in page and headers.get("Retry-After")
    results = []
    for caller in callers:
        out, _ = caller.communicate(timeout=120)
        assert caller.returncode == 0, procs.log_of(caller)
        results.append(json.loads(out))
    transcriber = Transcriber()
    for index, result in enumerate(results[:3]):
        assert result["assistant"] == [f"I heard: {FOUR_QUESTIONS[index]}"], result
        heard = transcriber.transcribe(read_wav(tmp_path / f"caller-{index}.wav").pcm, 48000)
        print(f"caller {index} heard {heard!r}")
        assert nearest_sentence(heard.removeprefix("i heard"), FOUR_QUESTIONS) == FOUR_QUESTIONS[index], (index, heard)
    # the fourth asked for the time: its conversation's own tools stage answered, the reply says it
    [answer] = results[3]["assistant"]
    assert re.fullmatch(r"It is \d\d \d\d in Tokyo\.", answer), results[3]
    for tap in taps:
        seen = tap.stop()
        sessions = {m.header.session for m in seen if m.header.src != "test"}
        topics = {m.topic for m in seen}
        print(f"bus of {tap.session}: {len(seen)} messages, sessions {sessions}")
        assert sessions == {tap.session}, (tap.session, sessions)
        assert {"audio.user", "rt.response.done"} <= topics, topics  # it saw the conversation, not nothing
    # each conversation's trace holds its own turn and nothing else; the sessions are all different
    sessions = {result["session"] for result in results}
    assert len(sessions) == 4
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((traces / s / "turns.jsonl").exists() for s in sessions):
        time.sleep(0.2)
    for index, result in enumerate(results):
        [turn] = load_turns(traces / result["session"])
        assert nearest_sentence(turn["user"]["transcript"], FOUR_QUESTIONS) == FOUR_QUESTIONS[index], turn["user"]
        called = [(t["name"], t.get("error")) for t in turn["tools"]]
        assert called == ([("get_current_time", None)] if index == 3 else []), turn["tools"]
    # hung up: the slots are free again within 2 s of the last caller leaving
    deadline = time.monotonic() + 2.0 + 1.0  # the reaper's half-second round, a stop, Ray's resource view
    while time.monotonic() < deadline and _status(url)["conversations"]:
        time.sleep(0.1)
    after = _status(url)
    # every slot is free again or already holds a prewarmed set (the pool refills at once)
    assert after["conversations"] == [] and sum(n["free"] for n in after["nodes"]) + after["prewarmed"] == \
        SLOTS_PER_NODE * NODES, after
    assert after["counts"]["busy_refused"] >= 1 and after["counts"]["ended"] == 4
    again = _call(procs, url, "what is the weather like today", tmp_path, "caller-again")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["assistant"] == ["I heard: what is the weather like today"]
    assert serve.poll() is None


STORY = ("Once upon a time there was a little robot who lived in a quiet town by the sea and every morning it "
         "walked down to the harbour to count the boats.")


def test_a_browser_page_through_serve_talks_and_is_cut_where_it_stopped_playing(procs, cluster, simulator, tmp_path):
    """The page `voicebus web` serves, through the front door: transcripts, and a barge-in truncated at the
    position the browser had played (its own recording against the stored generated audio)."""
    made, _nodes = cluster
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "weather", "reply": STORY}, {"match": ".*", "reply": "All right."}]))
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    traces = tmp_path / "traces"
    serve, url = _start_serve(procs, made.address, traces, "--prewarm", "1", env={"VOICEBUS_SIM_URL": sim})
    _wait_prewarmed(url, 1)  # Chromium's fake mic starts with getUserMedia: the call must be live at once
    speech = compose([("silence", 1.0), ("say", QUESTIONS[0]), ("silence", BARGE_IN_AFTER_S), ("say", "stop please"),
                      ("silence", 6.0)], 48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    with Chromium(url + "?record=1", fake_mic_wav=wav, log_path=tmp_path / "chromium.log") as page:
        page.evaluate("voicebus.connect()")
        page.wait_for("document.querySelector('.turn.assistant .meta')?.textContent.includes('interrupted')", 60)
        time.sleep(1.0)  # the recording runs on past the cut
        recording, _t0_ns = page_recording(page)
        session = page.evaluate("voicebus.session")
        turns = page.evaluate("Object.values(voicebus.turns).map(t => ({role: t.role, text: t.text}))")
        error = page.evaluate("voicebus.error")
        # the link the front door gave this caller opens their report once the hang-up has written it
        link = page.evaluate("voicebus.reportUrl")
        page.evaluate("voicebus.hangUp()")
        deadline = time.monotonic() + 60
        opened = [0, ""]
        while time.monotonic() < deadline and opened[0] != 200:
            opened = page.evaluate(f"fetch({json.dumps(link)}).then(r => r.text().then(t => [r.status, t]))")
            time.sleep(0.5)
    assert error == "" and session, (error, session)
    assert link.startswith(f"/report/{session}?key=") and opened[0] == 200, (link, opened[0])
    assert f"voicebus session {session}" in opened[1]
    assert _http(url.rstrip("/") + link.split("?")[0] + "?key=" + "0" * 32)[0] == 404
    assert _status(url)["conversations"] == []  # hung up
    user = [t["text"] for t in turns if t["role"] == "user"]
    assistant = [t["text"] for t in turns if t["role"] == "assistant"]
    assert user and "weather like today" in user[0], turns
    assert assistant and STORY.startswith(assistant[0][:40]), turns
    # the conversation's own store: the turn is a barge-in, its audio as generated, and where it was cut
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (traces / session / "turns.jsonl").exists():
        time.sleep(0.2)
    first = load_turns(traces / session)[0]
    audio_end_ms = first["assistant"]["played_ms"]
    assert first["assistant"]["barge_in"] and 500 < audio_end_ms < first["assistant"]["generated_ms"], first
    generated = sorted((traces / session / "audio").glob("*-assistant-generated.wav"))[0]
    source = np.frombuffer(read_wav(generated).pcm, "<i2").astype(np.float64)
    placed, heard_until_ms, cut_by_ms = where_the_browser_stopped(recording, source, audio_end_ms)
    print(f"placed: {placed.summary()}; audio_end_ms {audio_end_ms}; the browser played until "
          f"{heard_until_ms:.0f}..{cut_by_ms:.0f} ms")
    assert heard_until_ms - 60 <= audio_end_ms <= cut_by_ms + 60
    assert serve.poll() is None


def test_bad_input_gets_clear_http_errors_and_a_clean_stop_leaves_no_process(procs, cluster, tmp_path):
    made, _nodes = cluster
    # every stage set takes this long to start (its tools stage loads this module first, as one that
    # loads a model would): a caller who arrives while the pool refills finds it still refilling
    slow_tools = tmp_path / "slow_tools.py"
    slow_tools.write_text(f"import time\n\ntime.sleep({SLOW_START_S})\n\n\n"
                          "def nothing() -> str:\n    \"\"\"Does nothing.\"\"\"\n    return ''\n")
    serve, url = _start_serve(procs, made.address, tmp_path / "traces", "--prewarm", "2", "--tools", str(slow_tools))
    for body, expected in ((b"not json", "malformed offer"), (b'{"type": "answer", "sdp": "x"}', "expected JSON"),
                           (b"[1, 2]", "expected JSON")):
        status, text, _ = _http(url + "offer", body)
        assert status == 400 and expected in json.loads(text)["error"], text
    status, text, _ = _http(url + "offer", json.dumps({"type": "offer", "sdp": "v=0 nonsense"}).encode())
    assert status == 400 and "malformed offer" in json.loads(text)["error"], text
    status, text, _ = _http(url + "status?format=<script>")
    assert status == 400 and "unknown format" in text and "<script>" not in text
    assert _http(url + "status")[0] == 200 and "voicebus serve" in _http(url + "status")[1]
    # prewarmed stage sets: two callers are each handed one that already runs; a third, once the pool
    # is refilling, waits for a refill (hurried out of the background) instead of starting one more
    _wait_prewarmed(url, 2)
    callers = [_call(procs, url, question, tmp_path, f"caller-warm-{i}") for i, question in enumerate(QUESTIONS[:2])]
    deadline, now = time.monotonic() + 30, _status(url)
    while time.monotonic() < deadline and now["warming"] < 2:
        time.sleep(0.1)
        now = _status(url)
    assert now["warming"] == 2 and now["prewarmed"] == 0, now  # both taken, both being replaced
    waited_before = now["counts"]["waited_for_warming"]  # (the nonsense offer above waited for the first pool)
    cold_before = now["counts"]["cold_starts"]
    callers.append(_call(procs, url, QUESTIONS[2], tmp_path, "caller-after-refill"))
    for index, caller in enumerate(callers):
        out, _ = caller.communicate(timeout=120)
        assert caller.returncode == 0, procs.log_of(caller)
        result = json.loads(out)
        assert result["assistant"] == [f"I heard: {QUESTIONS[index]}"], result
        print(f"connect -> live, caller {index}: {result['connect_ms']} ms")
    assert _status(url)["counts"]["waited_for_warming"] == waited_before + 1
    assert _status(url)["counts"]["cold_starts"] == cold_before  # not one more start beside the refills
    # Ctrl-C: every stage set stops within 10 s and no process of any conversation is left on any node
    stage_processes = _stage_processes(made)
    per_set = len(WEB_STAGES) + 1  # its stages and its bus
    assert len(stage_processes) >= 2 * per_set, f"expected two stage sets under the Ray workers, found {stage_processes}"
    started = time.monotonic()
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=15) == 0, procs.log_of(serve)
    assert time.monotonic() - started < 10.0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(pid) for pid in stage_processes):
        time.sleep(0.1)
    assert [pid for pid in stage_processes if alive(pid)] == []


def _stage_processes(made) -> list[int]:
    """`voicebus` stage processes anywhere under the cluster's raylets (their workers run the actors)."""
    raylets = [proc.process.pid for node in [made.head_node, *made.worker_nodes]
               for proc in node.all_processes.get("raylet", [])]
    found = []
    for pid in {pid for raylet in raylets for pid in children_of(raylet)}:
        try:
            if b"services.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_killed_gateway_is_restarted_inside_its_conversation_and_a_lost_node_drops_only_its_callers(
        procs, cluster, tmp_path):
    made, nodes = cluster
    # every slot prewarmed: what is measured is the restart and the lost node, not four cold starts at once
    # (past the front door's 45 s on a loaded 2-core machine)
    serve, url = _start_serve(procs, made.address, tmp_path / "traces", "--prewarm", str(SLOTS_PER_NODE * NODES))
    _wait_prewarmed(url, SLOTS_PER_NODE * NODES, within_s=240)
    second = "please tell me a short story"
    two_turns = [(QUESTIONS[i], second) for i in range(4)]
    # each speaks its second question 20 s after its first reply played out, however late that reply came
    callers = [procs.voicebus("call", url, "--say", first, "--say", second, "--take-turns", "--pause", "20", "--json",
                              "--timeout", "150", stdout=subprocess.PIPE, name=f"caller-{i}")
               for i, (first, second) in enumerate(two_turns)]
    deadline = time.monotonic() + 90
    def replied(c: dict) -> bool:  # the server has finished its first reply
        return c["responses"] >= 1

    while time.monotonic() < deadline and not any(replied(c) for c in _status(url)["conversations"]):
        time.sleep(0.1)
    live = _status(url)["conversations"]
    assert len(live) == 4, live
    victim = next(c for c in live if replied(c))  # its first reply is done; its second question is 20 s away
    # kill -9 one conversation's gateway: its own launcher (the actor) restarts it, the call goes on
    gateway = victim["stage_pids"]["gateway"]
    # its node's host started it, and it is the gateway the status names
    assert gateway in children_of(victim["pid"])
    assert command_words(gateway)[3:4] == ["gateway"]
    os.kill(gateway, signal.SIGKILL)
    # a whole node lost mid-conversation: the other node's conversations (the victim's included) go on
    keep = victim["node_id"]
    [lost] = [node for node in nodes if node.node_id != keep]
    lost_sessions = {c["session"] for c in live if c["node_id"] == lost.node_id}
    assert len(lost_sessions) == SLOTS_PER_NODE
    made.remove_node(lost, allow_graceful=False)
    outcomes = {}
    for caller in callers:
        out, _ = caller.communicate(timeout=180)
        outcomes[caller] = (caller.returncode, out)
    kept = [json.loads(out) for code, out in outcomes.values() if code == 0]
    dropped = [caller for caller, (code, _) in outcomes.items() if code != 0]
    assert {r["session"] for r in kept} == {c["session"] for c in live} - lost_sessions, \
        "\n".join(f"{c.args[6]!r} -> {code}: {procs.log_of(c)[-600:]}" for c, (code, _) in outcomes.items())
    for result in kept:  # both turns answered, the killed gateway's conversation too
        print(f"{'victim' if result['session'] == victim['session'] else 'kept'}: {result['assistant']}")
        assert len(result["assistant"]) == 2 and result["assistant"][1].startswith("I heard: "), result
        # the second turn's own words came back (the simulator's recogniser may miss one of them)
        assert word_error_rate(second, result["assistant"][1].removeprefix("I heard: "))[0] <= 1, result
    assert len(dropped) == SLOTS_PER_NODE and all("the line dropped" in procs.log_of(c) for c in dropped)
    victim_ended = _ended(url, victim["session"])
    after = _status(url)
    assert victim_ended["restarts"] >= 1 and victim_ended["turns"] >= 2  # restarted, and the call went on
    assert after["counts"]["dropped"] == SLOTS_PER_NODE
    assert [n["node_id"] for n in after["nodes"]] == [keep]
    # a new caller lands on the node that is left
    again = _call(procs, url, "what is the weather like today", tmp_path, "caller-after")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, procs.log_of(again)
    assert _ended(url, json.loads(out)["session"])["node_id"] == keep


def test_a_drained_node_takes_no_new_caller_finishes_its_own_then_leaves_the_cluster(procs, cluster, tmp_path):
    made, nodes = cluster
    serve, url = _start_serve(procs, made.address, tmp_path / "traces", "--prewarm", str(SLOTS_PER_NODE * NODES))
    _wait_prewarmed(url, SLOTS_PER_NODE * NODES, within_s=240)  # no cold start to outwait on a loaded machine
    second = "please tell me a short story"
    staying = procs.voicebus("call", url, "--say", QUESTIONS[0], "--say", second, "--take-turns", "--pause", "15",
                             "--json", "--timeout", "150", stdout=subprocess.PIPE, name="caller-on-drained-node")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _status(url)["conversations"]:
        time.sleep(0.2)
    [live] = _status(url)["conversations"]
    drained_id = live["node_id"]
    # bad requests are told why; nothing is drained by them
    for body, status_wanted, said in ((b"[]", 400, "malformed drain request"), (b'{"node": "ab"}', 400, "hex digits"),
                                      (b'{"node": "0123456789"}', 404, "no node")):
        status, text, _ = _http(url + "drain", body)
        assert status == status_wanted and said in json.loads(text)["error"], text
    assert {n["state"] for n in _status(url)["nodes"]} == {"serving"}
    drain = procs.voicebus("serve", "drain", drained_id[:12], "--url", url, name="drain",
                           env={"VOICEBUS_OPERATOR_TOKEN": OPERATOR_TOKEN})
    assert drain.wait(timeout=30) == 0, procs.log_of(drain)
    assert "1 live finish" in procs.log_of(drain)
    by_id = {n["node_id"]: n for n in _status(url)["nodes"]}
    assert by_id[drained_id]["state"] == "draining" and by_id[drained_id]["free"] == 0
    # new callers land on the other node only; once it is full the next hears "busy", though the
    # draining node still has a slot nobody holds
    newcomers = [_call(procs, url, QUESTIONS[i], tmp_path, f"caller-new-{i}") for i in (1, 2)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(_status(url)["conversations"]) < 3:
        time.sleep(0.2)
    placed = _status(url)["conversations"]
    assert len(placed) == 3 and sorted(c["node_id"] == drained_id for c in placed) == [False, False, True], placed
    refused = procs.voicebus("call", url, "--say", "hello", name="caller-refused")
    assert refused.wait(timeout=30) == 3 and "all lines are busy" in procs.log_of(refused)
    for index, caller in zip((1, 2), newcomers, strict=True):
        out, _ = caller.communicate(timeout=120)
        assert caller.returncode == 0 and json.loads(out)["assistant"] == [f"I heard: {QUESTIONS[index]}"]
    # the drained node's own conversation is not cut short: both its turns are answered
    out, _ = staying.communicate(timeout=150)
    assert staying.returncode == 0, procs.log_of(staying)
    result = json.loads(out)
    assert len(result["assistant"]) == 2 and result["assistant"][0] == f"I heard: {QUESTIONS[0]}", result
    # idle now: Ray stops the drained node by itself, and serve goes on with the node left
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and drained_id in {n["node_id"] for n in _status(url)["nodes"]}:
        time.sleep(0.5)
    assert drained_id not in {n["node_id"] for n in _status(url)["nodes"]}, _status(url)
    gone = next(n for n in made.list_all_nodes() if n.node_id == drained_id)
    # the GCS marks the node dead as its raylet begins to exit; the process itself ends a moment later
    raylets = [proc.process for proc in gone.all_processes.get("raylet", [])]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(raylet.poll() is None for raylet in raylets):
        time.sleep(0.2)
    assert raylets and all(raylet.poll() is not None for raylet in raylets), "the drained node's raylet still runs"
    again = _call(procs, url, "what is the weather like today", tmp_path, "caller-after-drain")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["assistant"] == ["I heard: what is the weather like today"]
    assert serve.poll() is None


def test_a_conversations_turns_under_serve_are_the_users_not_the_servers_responses():
    """A turn that called a tool is two responses (the call, then the spoken answer): /status once said 3
    for a two-turn call with one tool."""
    import threading

    from common.envelope import Stamper
    from services.serving.serve.conversation import Conversation

    conversation = object.__new__(Conversation)  # its bookkeeping only: no stage set, no thread
    conversation.state = {"turns": 0, "responses": 0, "stages": [], "report": "", "ended": "", "last_activity": 0.0,
                          "last_latency_ms": None}
    conversation._beating, conversation._session_configured, conversation._ready = set(), False, threading.Event()
    gateway = Stamper("gateway", "s")
    for topic in ("rt.input_audio_buffer.speech_started", "rt.input_audio_buffer.speech_stopped",
                  "rt.response.done", "rt.response.done",  # the tool call, then its spoken answer
                  "rt.input_audio_buffer.speech_started", "rt.input_audio_buffer.speech_stopped", "rt.response.done"):
        conversation._note(gateway.event(topic, {"event": {}}, 1))
    assert conversation.state["turns"] == 2 and conversation.state["responses"] == 3


def test_serve_on_a_taken_port_says_so_before_starting_ray(tmp_path, base_env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--port", str(port)], cwd=REPO,
                                capture_output=True, text=True, timeout=60,
                                env={**base_env, "XDG_CONFIG_HOME": str(tmp_path)})
    assert result.returncode == 2 and f"cannot serve on 127.0.0.1:{port}: the port is taken" in result.stderr
    assert "ray" not in result.stderr.lower(), result.stderr  # Ray was never started


def test_with_every_node_drained_callers_hear_no_capacity_not_try_again(procs, cluster, tmp_path):
    """Once said "try again in 5 s" forever, with an empty node table and no warning (issue 48)."""
    made, _nodes = cluster
    serve, url = _start_serve(procs, made.address, tmp_path / "traces", "--prewarm", "0")
    for node in _status(url)["nodes"]:
        status, text, _ = _http(url + "drain", json.dumps({"node": node["node_id"]}).encode())
        assert status == 200, text
    status, text, _ = _http(url + "offer", json.dumps({"type": "offer", "sdp": TINY_OFFER}).encode())
    assert status == 503 and json.loads(text)["error"].startswith("no capacity: every node is draining or gone")
    caller = procs.voicebus("call", url, "--say", "hello", name="caller-no-capacity")
    assert caller.wait(timeout=60) == 3 and "no capacity" in procs.log_of(caller)
    assert _status(url)["warning"].startswith("no capacity")
    status, page, _ = _http(url + "status?format=html")
    assert status == 200 and "id='warning'" in page and "no capacity" in page
    status, page, _ = _http(url)
    assert status == 503 and "No capacity" in page
    assert "no_capacity" in procs.log_of(serve)


TINY_OFFER = "\r\n".join(["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "m=audio 9 UDP/TLS/RTP/SAVPF 111",
                          "c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd", "a=ice-pwd:" + "p" * 24,
                          "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=sendrecv", "a=rtpmap:111 opus/48000/2"])


TWILIO_TOKEN = "test-twilio-auth-token"


def test_two_phone_calls_and_a_browser_page_at_once_each_hear_their_own_answer(procs, cluster, simulator, tmp_path):
    """Phone calls through serve's Twilio door (the fake carrier, signed as Twilio signs, μ-law end to end)
    beside a Chromium page: three conversations at once, each its own stage set and its own stored
    session, each caller hearing the answer to their own question (one of them through a tool call)."""
    made, _nodes = cluster
    sim = simulator("--pace", "realtime")
    traces = tmp_path / "traces"
    serve, url = _start_serve(procs, made.address, traces, "--prewarm", "1", "--twilio-auth-token", TWILIO_TOKEN,
                              "--phone-voice", "ash", env={"VOICEBUS_SIM_URL": sim})
    _wait_prewarmed(url, 1)
    # a webhook request Twilio did not sign is refused before anything starts
    status, _text, _ = _http(url + "twilio/voice", b"CallSid=CAforged&From=%2B15005550006")
    assert status == 403
    phone_questions = [QUESTIONS[2], FOUR_QUESTIONS[3]]  # the moon; the time in Tokyo (a tool call)
    speech = compose([("silence", 1.0), ("say", QUESTIONS[0]), ("silence", 8.0)], 48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    at_once: list[list[str]] = []  # the kinds /status listed, sampled while the phones were on the line
    with Chromium(url, fake_mic_wav=wav, log_path=tmp_path / "chromium.log") as page:
        page.evaluate("voicebus.connect()")
        # the page is on the line before the phones ring and stays on until they hang up: the three overlap
        # however slowly a loaded machine starts Chromium or a cold stage set (the order used to be left to it)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(c["kind"] == "browser" for c in _status(url)["conversations"]):
            time.sleep(0.2)
        # flite's rms voice: the one whose words the offline recogniser still reads through a phone line's 8 kHz
        phones = [procs.voicebus("call", "--carrier", "twilio", url + "twilio/voice", "--say", question, "--json",
                                 "--voice", "rms", "--timeout", "120", stdout=subprocess.PIPE, name=f"phone-{index}",
                                 env={"TWILIO_AUTH_TOKEN": TWILIO_TOKEN})
                  for index, question in enumerate(phone_questions)]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(phone.poll() is None for phone in phones):
            at_once.append(sorted(c["kind"] for c in _status(url)["conversations"]))
            time.sleep(0.3)
        page.wait_for("Object.values(voicebus.turns).some(t => t.role === 'assistant' && t.text.endsWith('today'))",
                      90)
        browser_session = page.evaluate("voicebus.session")
        turns = page.evaluate("Object.values(voicebus.turns).map(t => ({role: t.role, text: t.text}))")
        page.evaluate("voicebus.hangUp()")
    results = []
    for phone in phones:
        out, _ = phone.communicate(timeout=60)
        assert phone.returncode == 0, procs.log_of(phone)
        results.append(json.loads(out))
    assert any("phone" in kinds and "browser" in kinds for kinds in at_once), at_once
    assert [t["text"] for t in turns if t["role"] == "assistant"][0] == f"I heard: {QUESTIONS[0]}", turns
    # each phone caller heard (recognised at 8 kHz from what the carrier played) their own answer
    candidates = [f"i heard {q}" for q in QUESTIONS] + ["the time in tokyo is"]
    for index, result in enumerate(results):
        assert len(result["heard"]) == 1, result
        heard = result["heard"][0]
        if index == 1:  # the tool's answer: "The time in Tokyo is HH:MM."
            assert "tokyo" in heard or "time" in heard, result
        else:
            assert nearest_sentence(heard, candidates) == f"i heard {phone_questions[index]}", result
    # three sessions stored: two phone calls at 8 kHz (one with its tool call), one browser at 24 kHz
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(traces.glob("*/turns.jsonl"))) < 3:
        time.sleep(0.5)
    stored = {path.parent.name: load_turns(path.parent) for path in traces.glob("*/turns.jsonl")}
    assert len(stored) == 3, sorted(stored)
    assert stored[browser_session][0]["audio_rate"] == 24000
    phone_turns = [turns for session, turns in stored.items() if session != browser_session]
    assert sorted(turns[0]["audio_rate"] for turns in phone_turns) == [8000, 8000]
    assert sum(1 for turns in phone_turns if turns[0]["tools"]) == 1, phone_turns
    # the front door learns of each end from its stage set, a moment after the caller has gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_status(url)["ended"]) < 3:
        time.sleep(0.5)
    ended = _status(url)["ended"]
    assert sorted(e["kind"] for e in ended) == ["browser", "phone", "phone"], ended
    assert _status(url)["counts"]["phone_placed"] == 2 and serve.poll() is None
