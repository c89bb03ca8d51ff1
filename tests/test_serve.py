"""`voicebus serve` on a local multi-node Ray cluster (ray.cluster_utils: a head and two nodes of two
slots each, one machine): real callers (`voicebus call`, aiortc) over real WebRTC, one stage set each."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.speech import Transcriber
from common.wavio import read_wav
from services.logger.store import load_turns
from tests.helpers import alive, children_of

QUESTIONS = ["what is the weather like today", "please turn on the lights in the kitchen",
             "how far away is the moon", "can you help me with my homework"]
KEY_WORDS = ["weather", "lights", "moon", "help"]
SLOTS_PER_NODE, NODES = 2, 2
pytestmark = pytest.mark.timeout(300)  # a cluster, several stage sets and real calls per test


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [made.add_node(num_cpus=1, resources={"conversation": SLOTS_PER_NODE}) for _ in range(NODES)]
    made.wait_for_nodes()
    yield made, nodes
    made.shutdown()


def _http(url: str, body: bytes | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def _status(url: str) -> dict:
    return json.loads(_http(url + "status?format=json")[1])


def _start_serve(procs, cluster_address: str, traces, *extra: str) -> tuple[subprocess.Popen, str]:
    serve = procs.voicebus("serve", "--ray-address", cluster_address, "--node-host", "127.0.0.1", "--port", "0",
                           "--root", str(traces), "--idle-timeout", "60", *extra)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        match = re.search(r"serving url=(\S+)", procs.log_of(serve))
        if match:
            return serve, match.group(1)
        assert serve.poll() is None, procs.log_of(serve)
        time.sleep(0.2)
    raise AssertionError(f"serve did not start:\n{procs.log_of(serve)}")


def _call(procs, url: str, question: str, tmp_path, name: str) -> subprocess.Popen:
    return procs.voicebus("call", url, "--say", question, "--json", "--timeout", "90", "--record",
                          str(tmp_path / f"{name}.wav"), stdout=subprocess.PIPE, name=name)


def test_four_callers_at_once_each_hear_their_own_answer_in_a_stage_set_of_their_own(procs, cluster, tmp_path):
    made, _nodes = cluster
    traces = tmp_path / "traces"
    serve, url = _start_serve(procs, made.address, traces, "--prewarm", "0")
    callers = [_call(procs, url, question, tmp_path, f"caller-{i}") for i, question in enumerate(QUESTIONS)]
    # every slot is taken while they talk: the next caller hears so at once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_status(url)["conversations"]) < len(QUESTIONS):
        time.sleep(0.2)
    placed = _status(url)
    assert len(placed["conversations"]) == 4, placed
    assert sorted(n["used"] for n in placed["nodes"]) == [SLOTS_PER_NODE] * NODES  # Ray spread them, 2 and 2
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
    for index, result in enumerate(results):
        assert result["assistant"] == [f"I heard: {QUESTIONS[index]}"], result
        heard = transcriber.transcribe(read_wav(tmp_path / f"caller-{index}.wav").pcm, 48000)
        others = [word for other, word in enumerate(KEY_WORDS) if other != index and word in heard]
        print(f"caller {index} heard {heard!r}")
        assert KEY_WORDS[index] in heard and not others, (index, heard)
    # each conversation's trace holds its own turn and nothing else; the sessions are all different
    sessions = {result["session"] for result in results}
    assert len(sessions) == 4
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((traces / s / "turns.jsonl").exists() for s in sessions):
        time.sleep(0.2)
    for index, result in enumerate(results):
        [turn] = load_turns(traces / result["session"])
        assert KEY_WORDS[index] in turn["user"]["transcript"], turn["user"]
    # hung up: the slots are free again within 2 s of the last caller leaving
    deadline = time.monotonic() + 2.0 + 1.0  # the reaper's half-second round, a stop, Ray's resource view
    while time.monotonic() < deadline and _status(url)["conversations"]:
        time.sleep(0.1)
    after = _status(url)
    assert after["conversations"] == [] and sorted(n["free"] for n in after["nodes"]) == [SLOTS_PER_NODE] * NODES
    assert after["counts"]["busy_refused"] >= 1 and after["counts"]["ended"] == 4
    again = _call(procs, url, "what is the weather like today", tmp_path, "caller-again")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["assistant"] == ["I heard: what is the weather like today"]
    assert serve.poll() is None


def test_bad_input_gets_clear_http_errors_and_a_clean_stop_leaves_no_process(procs, cluster, tmp_path):
    made, _nodes = cluster
    serve, url = _start_serve(procs, made.address, tmp_path / "traces", "--prewarm", "2")
    for body, expected in ((b"not json", "malformed offer"), (b'{"type": "answer", "sdp": "x"}', "expected JSON"),
                           (b"[1, 2]", "expected JSON")):
        status, text, _ = _http(url + "offer", body)
        assert status == 400 and expected in json.loads(text)["error"], text
    status, text, _ = _http(url + "offer", json.dumps({"type": "offer", "sdp": "v=0 nonsense"}).encode())
    assert status == 400 and "malformed offer" in json.loads(text)["error"], text
    status, text, _ = _http(url + "status?format=<script>")
    assert status == 400 and "unknown format" in text and "<script>" not in text
    assert _http(url + "status")[0] == 200 and "voicebus serve" in _http(url + "status")[1]
    # prewarmed stage sets: a caller is handed one that already runs
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _status(url)["prewarmed"] < 2:
        time.sleep(0.2)
    assert _status(url)["prewarmed"] == 2
    caller = _call(procs, url, "what is the weather like today", tmp_path, "caller-warm")
    out, _ = caller.communicate(timeout=120)
    assert caller.returncode == 0, procs.log_of(caller)
    print(f"connect -> live with a prewarmed stage set: {json.loads(out)['connect_ms']} ms")
    # Ctrl-C: every stage set stops within 10 s and no process of any conversation is left on any node
    stage_processes = _stage_processes(made)
    assert len(stage_processes) >= 2 * 6, f"expected two stage sets under the Ray workers, found {stage_processes}"
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
