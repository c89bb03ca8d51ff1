"""`serve` on a network: its control endpoints answer only the operator, and a stage set only its front door.

One real `voicebus serve` (embedded Ray, one slot, one prewarmed stage set) taken on as an attacker on
the same machine would, then a real caller through the front door."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

TOKEN = "security-test-operator-token-" + "7" * 16
pytestmark = pytest.mark.timeout(300)


def _request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None
             ) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _status(url: str) -> dict:
    code, text = _request(url + "status?format=json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, text
    return json.loads(text)


def _web_stage_ports(serve_pid: int) -> list[int]:
    """The ports the stage sets' web stages listen on, found as an attacker on this machine would: by
    their command lines (`voicebus web ... --port N`). Only this serve's (its embedded Ray runs under
    it): a web stage another test runs meanwhile is no stage set's."""
    from common.processes import command_words, descendants

    ports = []
    for pid in descendants(serve_pid):
        try:
            text = " ".join(command_words(pid))
        except OSError:
            continue
        match = re.search(r"\bweb\b.*--port (\d+)", text)
        if match:
            ports.append(int(match.group(1)))
    return sorted(set(ports))


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from tests.helpers import Procs

    tmp = tmp_path_factory.mktemp("serve-access")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_", "WANDB_"))}
    procs = Procs({**env, "PYTHONUNBUFFERED": "1", "VOICEBUS_RUN_DIR": str(tmp), "XDG_CONFIG_HOME": str(tmp)}, tmp)
    serve = procs.voicebus("serve", "--port", "0", "--slots", "1", "--prewarm", "1", "--root", str(tmp / "sessions"),
                           "--idle-timeout", "60", env={"VOICEBUS_OPERATOR_TOKEN": TOKEN})
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline and url is None:
        match = re.search(r"serving url=(\S+)", procs.log_of(serve))
        url = match.group(1) if match else None
        assert serve.poll() is None, procs.log_of(serve)
        time.sleep(0.2)
    assert url, procs.log_of(serve)
    while time.monotonic() < deadline and _status(url)["prewarmed"] < 1:
        time.sleep(0.2)
    assert _status(url)["prewarmed"] == 1
    yield {"url": url, "procs": procs, "serve": serve, "tmp": tmp}
    procs.stop_all()


def test_control_endpoints_answer_only_the_operator_and_nothing_is_done_for_anyone_else(serving):
    url = serving["url"]
    [node] = _status(url)["nodes"]
    drain = json.dumps({"node": node["node_id"][:12]}).encode()
    origin = url.rstrip("/")
    attempts = {
        "status, no token": (url + "status?format=json", "GET", None, {}, 401),
        "status page, no token": (url + "status", "GET", None, {}, 401),
        "status, wrong token": (url + "status", "GET", None, {"Authorization": "Bearer " + "x" * 40}, 401),
        "status, basic auth with a wrong password": (url + "status", "GET", None,
                                                     {"Authorization": "Basic dXNlcjp3cm9uZw=="}, 401),
        "drain, no token, cross-site simple POST": (url + "drain", "POST", drain, {
            "Content-Type": "text/plain", "Origin": "http://evil.example"}, 403),
        "drain, no token": (url + "drain", "POST", drain, {"Content-Type": "application/json"}, 401),
        "drain with the token, from another origin": (url + "drain", "POST", drain, {
            "Content-Type": "application/json", "Origin": "http://evil.example", "Authorization": f"Bearer {TOKEN}"},
            403),
        "drain with the token, as text/plain": (url + "drain", "POST", drain, {
            "Content-Type": "text/plain", "Origin": origin, "Authorization": f"Bearer {TOKEN}"}, 415),
        "status with the token, under a rebound name": (url + "status", "GET", None, {
            "Host": "evil.example", "Authorization": f"Bearer {TOKEN}"}, 403),
    }
    for what, (target, method, body, headers, wanted) in attempts.items():
        code, text = _request(target, method=method, body=body, headers=headers)
        assert code == wanted, (what, code, text)
        assert node["node_id"] not in text and "conversations" not in text, what  # nothing was told
    # the operator's own malformed request: one line, never a traceback (JSON nested past Python's limit)
    code, text = _request(url + "drain", method="POST", body=b"[" * 100_000 + b"]" * 100_000, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert code == 400 and "malformed drain request" in text and "Traceback" not in text, text
    # nothing was done: the node still serves
    assert [n["state"] for n in _status(url)["nodes"]] == ["serving"]
    # the operator, by the name of the page or by an IP literal, with basic auth as a browser sends it
    import base64

    basic = "Basic " + base64.b64encode(f"operator:{TOKEN}".encode()).decode()
    code, page = _request(url + "status", headers={"Authorization": basic, "Host": "localhost"})
    assert code == 200 and "voicebus serve" in page


def test_a_stage_set_refuses_offers_that_did_not_come_through_its_front_door_and_still_serves_a_caller(serving):
    url, procs = serving["url"], serving["procs"]
    ports = _web_stage_ports(serving["serve"].pid)
    assert ports, "no web stage found listening"
    offer = json.dumps({"type": "offer", "sdp": "v=0\r\n"}).encode()
    for port in ports:
        for path, method, body in (("/offer", "POST", offer), ("/", "GET", None)):
            code, text = _request(f"http://127.0.0.1:{port}{path}", method=method, body=body,
                                  headers={"Content-Type": "application/json"})
            assert code == 403 and "only from its voicebus serve front door" in text, (port, path, code, text)
    status = _status(url)
    assert status["prewarmed"] == 1 and status["conversations"] == []  # the set was not taken
    # the set is handed to the next caller through the front door, and works (one slot: it is that set)
    caller = procs.voicebus("call", url, "--say", "what is the weather like today", "--json", "--timeout", "90",
                            stdout=subprocess.PIPE, name="caller")
    out, _ = caller.communicate(timeout=150)
    assert caller.returncode == 0, procs.log_of(caller)
    assert json.loads(out)["assistant"] == ["I heard: what is the weather like today"]


RECVONLY_OFFER = "\r\n".join(["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "m=audio 9 UDP/TLS/RTP/SAVPF 111",
                              "c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd", "a=ice-pwd:" + "p" * 24,
                              "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=recvonly", "a=rtpmap:111 opus/48000/2"])


def _status_from(url: str, source: str) -> int:
    """GET /status from another loopback address (127.0.0.0/8 is all ours): another client."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", "/status?format=json", headers={"Authorization": f"Bearer {TOKEN}"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_slowloris_burst_is_capped_per_client_and_closed_after_the_header_timeout(serving):
    """40 connections from one address, each sending a header line a second and never finishing: those past
    the per-client cap are closed at once, the rest when the header timeout fires; another client is
    answered throughout, and this one again afterwards."""
    import socket

    from services.stages.web.connections import HEADER_TIMEOUT_S, MAX_CONNECTIONS_PER_CLIENT

    url = serving["url"]
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    slow = []
    for _ in range(MAX_CONNECTIONS_PER_CLIENT + 8):
        connection = socket.create_connection((host, int(port)), timeout=5)
        connection.sendall(b"GET /status HTTP/1.1\r\nHost: " + host.encode() + b"\r\n")
        slow.append(connection)
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(slow) and time.monotonic() - opened < HEADER_TIMEOUT_S + 20:
        for index, connection in enumerate(slow):
            if index in closed_at:
                continue
            try:
                connection.sendall(b"X-Slow: 1\r\n")
                connection.settimeout(0.01)
                if connection.recv(1) == b"":
                    closed_at[index] = time.monotonic() - opened
            except TimeoutError:
                pass
            except OSError:
                closed_at[index] = time.monotonic() - opened
        if len(closed_at) < len(slow) and time.monotonic() - opened < 2:
            assert _status_from(url, "127.0.0.2") == 200  # another client is answered during the burst
        time.sleep(0.5)
    for connection in slow:
        connection.close()
    assert len(closed_at) == len(slow), f"{len(slow) - len(closed_at)} slow connections still open"
    early = sorted(closed_at.values())[:8]
    assert all(at < HEADER_TIMEOUT_S / 2 for at in early), early  # over the cap: closed on arrival
    assert max(closed_at.values()) < HEADER_TIMEOUT_S + 20
    assert sum(1 for at in closed_at.values() if at >= HEADER_TIMEOUT_S - 1) >= MAX_CONNECTIONS_PER_CLIENT - 2
    assert _status(url)["prewarmed"] >= 0  # this client is answered again


def _settled_sessions(root: Path, quiet_s: float = 3.0, within_s: float = 30.0) -> list[str]:
    """The session directories once none has appeared for `quiet_s`."""
    listing, since, deadline = None, time.monotonic(), time.monotonic() + within_s
    while time.monotonic() < deadline:
        now = sorted(p.name for p in root.glob("*")) if root.exists() else []
        if now != listing:
            listing, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return listing or []


def test_junk_offers_cost_no_stage_set_and_one_client_is_held_to_its_limit(serving):
    """Run last in this module: it spends this client's offers for a minute."""
    url, tmp = serving["url"], serving["tmp"]
    deadline = time.monotonic() + 90  # an earlier test's caller hung up: its slot's next set is prewarmed
    while time.monotonic() < deadline and (_status(url)["prewarmed"] < 1 or _status(url)["conversations"]):
        time.sleep(0.2)
    before = _status(url)
    sessions_before = _settled_sessions(tmp / "sessions")  # the prewarmed set's own, once its logger made it
    junk = [(b'{"type": "offer", "sdp": "v=0"}', "no audio section"),
            (json.dumps({"type": "offer", "sdp": RECVONLY_OFFER}).encode(), "recvonly"),
            (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
            (b'{"type": "offer", "sdp": "hello"}', "does not start with v=0")]
    for body, said in junk:
        code, text = _request(url + "offer", method="POST", body=body, headers={"Content-Type": "application/json"})
        assert code == 400 and said in json.loads(text)["error"] and "Traceback" not in text, (said, code, text)
    refused = {}
    for _ in range(40):  # one client, serially: held to 30 a minute (--client-offers' default), told when to return
        code, text = _request(url + "offer", method="POST", body=junk[0][0],
                              headers={"Content-Type": "application/json"})
        refused[code] = refused.get(code, 0) + 1
    assert refused.get(429, 0) >= 10 and set(refused) <= {400, 429}, refused
    after = _status(url)
    # no stage set was started, taken or lost for any of it; no session left behind
    for counter in ("placed", "cold_starts", "failed_starts"):
        assert after["counts"][counter] == before["counts"][counter], counter
    assert after["prewarmed"] == 1 and after["warming"] == 0 and after["conversations"] == []
    assert after["counts"]["client_limited"] >= 10
    assert _settled_sessions(tmp / "sessions") == sessions_before
