"""One conversation: its own stage set, run by its node's host (`services.serving.serve.node_host`).

It holds one `conversation` slot of its node (a Ray placement group of one bundle, which the front
door reserves: Ray picks the node). It starts a run dir of its own with a bus and the browser
path's stages (web, tools, gateway, logger, and the simulator when offline), exactly as `voicebus
up --web` does, and its web stage answers the browser's offer, so media flows between the browser
and this node; only signalling passed through the front door. The conversation is over when its
caller hangs up or vanishes (the web stage's `session.end`) or has been idle too long; the front
door then stops it, which stops every process it started. Its stages are forks of the node host's
zygote (`services.zygote`: imported once for all the node's conversations, so a stage set starts in
milliseconds and shares those pages); they die with it, and it with the node host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.config import BusConfig
from common.log import kv
from common.ports import free_port
from common.processes import cpu_seconds, descendants_of
from services.stages.web.placement import OFFER_SECRET_ENV, OFFER_SECRET_HEADER

SLOT_RESOURCE = "conversation"
# a prewarmed stage set starts (and waits) at this niceness, and goes to 0 when a caller gets it: at
# the same weight as live conversations a start takes the CPU from their audio (3.4 s of CPU a start of
# fresh interpreters, 0.13 s forked by the node's zygote: even then, bench_serve at 4 heard 2-7 stage
# underruns in each of three runs with sets warming at 0, none at 5 or 10, and Connect -> live was the
# same at 5 as at 10 within the noise). One started for a caller who is waiting runs at 0 from the
# start (at 10 on a busy machine it can take minutes)
WARMING_NICE = 10
READY_TIMEOUT_S = 60.0
# which processes are this set's is looked up in all of /proc (~1.3 ms a time with 66 processes; a
# node with ten conversations has hundreds, and the front door asks each for its status twice a
# second): the list is reused this long, a restarted stage is counted from its next lookup
TREE_REFRESH_S = 5.0
OFFER_TIMEOUT_S = 30.0
WATCH = ["health.", "session.", "web.", "phone.", "rt.response.done", "rt.input_audio_buffer.speech_st",  # started, stopped
         "rt.session.updated"]

log = logging.getLogger("voicebus.serve")


class Conversation:
    """One caller's stage set on this node, in its node host's process (several share it)."""

    def __init__(self, session: str, settings: dict[str, Any], node_id: str, host: str, prewarm: bool = False,
                 kind: str = "browser") -> None:
        self.session = session
        self.kind = kind  # "browser" (the web stage) or "phone" (the phone stage, μ-law end to end)
        self.prewarm = prewarm  # started ahead of any caller: in the background (WARMING_NICE)
        self.settings = settings
        self.node_id = node_id
        self.host = host  # the address its web stage serves media on
        self.started_at = time.time()
        self.run_dir = Path(tempfile.mkdtemp(prefix="vb-c-", dir="/tmp"))
        os.chmod(self.run_dir, 0o700)
        self.web_port = free_port()
        # its web stage takes an offer only with this (from the front door, through this host): a caller who
        # finds the port cannot take the set over (its env carries it: never an argument, a log or the bus)
        self.offer_secret = secrets.token_urlsafe(32)
        self.state: dict[str, Any] = {"turns": 0, "responses": 0, "last_latency_ms": None, "report": "", "ended": "",
                                      "stages": [], "restarts": 0, "last_activity": time.monotonic()}
        self._ready = threading.Event()  # every stage beats and the Realtime session is configured
        self._beating: set[str] = set()
        self._session_configured = False
        self._stop = threading.Event()
        # readable once `stop` is called: the stage set's thread sleeps on it (None once closed)
        self._stop_pipe: tuple[int, int] | None = os.pipe()
        self._stop_pipe_lock = threading.Lock()  # the host is a threaded actor: two stops may meet
        self._failed = ""
        self._cpu_at = time.monotonic()  # the last status: when ...
        self._cpu_seen: dict[int, float] = {}  # ... and the CPU seconds of each process then
        self._supervisor: Any = None  # its launcher (services.launcher.Supervisor), once made
        self._tree: list[int] = []  # its processes ...
        self._tree_at = 0.0  # ... looked up then
        self._thread = threading.Thread(target=self._run, name="stage-set", daemon=True)
        self._thread.start()

    # --- called by the front door -------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Once its web stage serves: where it runs (raises if the stage set could not start)."""
        if not self._ready.wait(READY_TIMEOUT_S) or self._failed:
            raise RuntimeError(self._failed or f"the stage set did not start within {READY_TIMEOUT_S:.0f} s")
        return {"session": self.session, "node_id": self.node_id, "host": self.host, "web_port": self.web_port}

    def offer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The browser's offer, answered by this conversation's web stage: {status, body, took_ms}, where
        took_ms says where this host's part of Connect -> live went (the front door logs it).

        A prewarmed set leaves the warming priority beside the answer, not before it: the answer comes
        from the web stage's loop thread, which runs at its own raised priority anyway, while the look
        through /proc for the set's threads took an offer 60-250 ms on a loaded node (its host
        process's GIL shared with every conversation's thread)."""
        began = time.monotonic()
        if self.prewarm:
            threading.Thread(target=self._to_foreground, name="foreground", daemon=True).start()
        request = urllib.request.Request(f"http://{self.host}:{self.web_port}/offer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  OFFER_SECRET_HEADER: self.offer_secret})
        try:
            with urllib.request.urlopen(request, timeout=OFFER_TIMEOUT_S) as response:
                answer = {"status": response.status, "body": json.loads(response.read())}
        except urllib.error.HTTPError as error:
            answer = {"status": error.code, "body": json.loads(error.read() or b"{}")}
        return {**answer, "took_ms": {"web_answer": round(1000 * (time.monotonic() - began), 1)}}

    def phone_stream(self) -> dict[str, str]:
        """Where the carrier streams this call, and the token its `start` must carry (a Parameter of the
        TwiML: Twilio keeps no query string). The token is this set's own: no other call can take it."""
        if self.kind != "phone":
            raise ValueError(f"conversation {self.session} is a {self.kind}'s, not a phone call's")
        from services.stages.phone.line import MEDIA_PATH

        return {"url": f"ws://{self.host}:{self.web_port}{MEDIA_PATH}", "token": self.offer_secret}

    def status(self) -> dict[str, Any]:
        state = dict(self.state)
        idle_s = time.monotonic() - state.pop("last_activity")
        idle_limit = float(self.settings.get("idle_timeout_s") or 0)
        if idle_limit and idle_s > idle_limit and not state["ended"]:
            self.state["ended"] = state["ended"] = f"idle for {idle_s:.0f} s (--idle-timeout)"
        return {**state, "session": self.session, "kind": self.kind, "node_id": self.node_id, "host": self.host,
                "age_s": round(time.time() - self.started_at, 1), "idle_s": round(idle_s, 1),
                # the node host's process, and this conversation's own (its bus and stages, by name)
                "pid": os.getpid(), "stage_pids": self._stage_pids(),
                # this conversation's own bus, on its node: `voicebus tap --pub P --sub S` there watches it
                "bus": {"pub": f"ipc://{self.run_dir}/pub.sock", "sub": f"ipc://{self.run_dir}/sub.sock"},
                "cpu_pct": self._cpu_pct(), "node_load": round(os.getloadavg()[0], 2), "node_cpus": os.cpu_count()}

    def _stage_pids(self) -> dict[str, int]:
        supervisor = self._supervisor
        if supervisor is None:
            return {}
        pids = {child.spec.name: child.proc.pid for child in supervisor.children if child.proc is not None}
        return {"bus": supervisor.bus_proc.pid, **pids} if supervisor.bus_proc is not None else pids

    def _processes(self) -> list[int]:
        """This stage set's processes: its bus and stages and what they started (not its neighbours')."""
        tops = list(self._stage_pids().values())
        return [*tops, *descendants_of(tops)]

    def _cpu_pct(self) -> float:
        """% of one core the stage set's processes used since the last status."""
        now = time.monotonic()
        if now - self._tree_at > TREE_REFRESH_S:
            self._tree_at, self._tree = now, self._processes()
        seen: dict[int, float] = {}
        for pid in self._tree:
            with contextlib.suppress(OSError):  # ended meanwhile
                seen[pid] = cpu_seconds(pid)
        # per process, so that one that ended does not take its past time out of this interval
        spent = sum(seconds - self._cpu_seen.get(pid, 0.0) for pid, seconds in seen.items())
        then, self._cpu_at, self._cpu_seen = self._cpu_at, now, seen
        return round(100 * spent / (now - then), 1) if now > then else 0.0

    def hurry(self) -> None:
        """A caller is waiting for this prewarmed set while it still starts: start it at full weight."""
        if self.prewarm:
            self._to_foreground()

    def stop(self) -> dict[str, Any]:
        """Stop every process of this conversation (stores its turns on the way) and remove its run dir."""
        self._stop.set()
        with self._stop_pipe_lock:
            if self._stop_pipe is not None:
                os.write(self._stop_pipe[1], b"x")
        self._thread.join(timeout=15)
        with self._stop_pipe_lock:
            if self._stop_pipe is not None and not self._thread.is_alive():
                for fd in self._stop_pipe:
                    os.close(fd)
                self._stop_pipe = None
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.status()

    def _to_foreground(self) -> None:
        """A caller has this stage set now: its processes (and the thread that restarts them) leave the
        warming priority. Only threads still at WARMING_NICE: an audio stage has raised its own."""
        tasks = [self._thread.native_id or 0]
        for pid in self._processes():
            try:
                tasks += [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
        for tid in tasks:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) == WARMING_NICE:
                    os.setpriority(os.PRIO_PROCESS, tid, 0)
            except OSError:
                continue  # gone meanwhile, or not permitted (then it stays nice: slower, not wrong)

    # --- the stage set's own thread (owns the supervisor's sockets) ------------------------------
    def _run(self) -> None:
        from common.bus import Receiver, connect_sub, wait_for_bus
        from services.launcher import POLL_INTERVAL_S, LauncherError, Supervisor, default_zygote
        from services.pipeline import PHONE_GATEWAY_ARGS, PHONE_STAGES, WEB_STAGES, pipeline_specs

        if self.prewarm:
            with contextlib.suppress(OSError):  # this thread only: what it starts inherits it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARMING_NICE)
        cfg = BusConfig(pub=f"ipc://{self.run_dir}/pub.sock", sub=f"ipc://{self.run_dir}/sub.sock")
        phone = self.kind == "phone"
        phone_voice = ["--voice", self.settings["phone_voice"]] if phone and self.settings.get("phone_voice") else []
        gateway_args = [*(PHONE_GATEWAY_ARGS if phone else []), *phone_voice, *self.settings.get("gateway_args", [])]
        extra = {"phone" if phone else "web": ["--host", self.host, "--port", str(self.web_port)],
                 "logger": list(self.settings.get("logger_args", [])),
                 **({"tools": list(self.settings["tools_args"])} if self.settings.get("tools_args") else {}),
                 **({"gateway": gateway_args} if gateway_args else {}),
                 **({"simulator": list(self.settings["simulator_args"])}
                    if self.settings.get("simulator_args") else {})}
        specs, env = pipeline_specs(PHONE_STAGES if phone else WEB_STAGES, extra)
        # its stages' run dir (passed, not set here: the host's other conversations share os.environ)
        supervisor = Supervisor(cfg, specs, self.session, {**env, "VOICEBUS_RUN_DIR": str(self.run_dir),
                                                           OFFER_SECRET_ENV: self.offer_secret},
                                lock_dir=self.run_dir, zygote=default_zygote())
        self._supervisor = supervisor
        self.state["stages"] = [spec.name for spec in specs]
        receiver: Receiver | None = None

        def watch() -> None:
            """Subscribed before any stage starts, so its first heartbeat counts: subscribed after, a
            set was often ready a beat later (HEARTBEAT_INTERVAL_S, 1 s; two starts in three)."""
            nonlocal receiver
            receiver = Receiver(connect_sub(supervisor.ctx, cfg, WATCH), "serve")
            if not wait_for_bus(supervisor.ctx, cfg, timeout_s=5.0, sub=receiver.sock):
                log.warning(kv("watch_not_attached", session=self.session))  # ready a beat later, not never

        try:
            supervisor.start(on_bus_up=watch)
            assert receiver is not None and self._stop_pipe is not None  # closed only once this thread has ended
            stop_fd = self._stop_pipe[0]
            while not self._stop.is_set() and supervisor.fatal is None:
                supervisor.poll()
                self.state["restarts"] = sum(child.restarts for child in supervisor.children)
                # until the next poll is due (or a stage exits), woken by each message and by `stop`
                deadline = time.monotonic() + POLL_INTERVAL_S
                while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0 and \
                        not supervisor.wait(left, wake=(receiver.sock, stop_fd)):
                    while (message := receiver.recv(timeout_ms=0)) is not None:
                        self._note(message)
            if supervisor.fatal is not None:
                self._failed = supervisor.fatal
        except LauncherError as exc:
            self._failed = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to ready() and the front door
            self._failed = f"{type(exc).__name__}: {exc}"
            log.exception(kv("stage_set_failed", session=self.session))
        finally:
            self._ready.set()
            if receiver is not None:
                receiver.sock.close(linger=0)
            supervisor.stop()

    def _note(self, message) -> None:
        topic = message.topic
        if topic.startswith("health."):
            self._beating.add(topic.removeprefix("health."))
        if topic == "rt.session.updated" or (topic == "health.gateway" and message.data.get("session_configured")):
            self._session_configured = True  # (the heartbeat: for a watch that began after that event)
        if not self._ready.is_set() and self._session_configured and \
                set(self.state["stages"]) - {"simulator"} <= self._beating:
            self._ready.set()  # a caller's first words now reach the server
            log.info(kv("stage_set_ready", session=self.session, prewarm=self.prewarm,
                        start_ms=round(1000 * (time.time() - self.started_at))))
        if topic == "health.logger":
            self.state["report"] = str(message.data.get("session_dir", "")) or self.state["report"]
        elif topic == "session.end" and not self.state["ended"]:
            self.state["ended"] = str(message.data.get("reason") or "the caller hung up")
        elif topic == "rt.response.done":  # a turn that called a tool has two: the call, then the spoken answer
            self.state["responses"] += 1
            self.state["last_activity"] = time.monotonic()
        elif topic == "rt.input_audio_buffer.speech_started":
            self.state["last_activity"] = time.monotonic()
        elif topic == "rt.input_audio_buffer.speech_stopped":  # the user's turns, as the server heard them
            self.state["turns"] += 1
        elif topic == "web.turn":
            self.state["last_latency_ms"] = message.data.get("latency_ms")
        elif topic in ("web.connected", "phone.started"):
            self.state["last_activity"] = time.monotonic()

