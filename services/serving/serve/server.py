"""Start Ray (an embedded local one by default, or join `--ray-address`), the front door, and stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from common.config import openai_target
from common.log import kv
from common.ports import free_port, port_listening
from services.serving.serve.conversation import SLOT_RESOURCE
from services.serving.serve.front import NAMESPACE, FrontDoor

# One browser conversation under serve, its share of Ray included, measured 16-18 % of a core (README,
# Benchmarks: bench_serve 2026-12-02); a node is full at 70 % (LiveKit's load threshold), so 2 cores
# hold 8 by default. `--slots` overrides.
CONVERSATION_CORE_SHARE = 0.17
LOAD_TARGET = 0.7
SIMULATOR_READY_S = 30.0
RAY_SHUTDOWN_S = 4.0

log = logging.getLogger("voicebus.serve")


def default_slots() -> int:
    return max(1, int((os.cpu_count() or 1) * LOAD_TARGET / CONVERSATION_CORE_SHARE))


def private_ray_token(create: bool) -> Path:
    """Ray's token file (`~/.ray/auth_token`, where `ray` and every worker look), readable by its owner only.

    Ray 2.60 writes it 0644: any local user could read the key to the cluster. Made here 0600 before Ray
    would make it (`create`: an embedded cluster's own), and one found readable by others is narrowed (and
    said)."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = Path.home() / ".ray" / "auth_token"
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as token_file:
                token_file.write(generate_new_authentication_token())
            return path
    if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
        log.warning(kv("ray_token_narrowed", path=str(path), mode="0600", why="was readable by other users"))
    return path


def start_ray(address: str | None, slots: int | None) -> dict[str, Any]:
    """Join a cluster, or start an embedded single-node Ray (dashboard off, token auth).

    Ray 2.60's gRPC servers listen on every interface whatever address a node advertises; what keeps
    others out is the token: an embedded Ray requires one (`RAY_AUTH_MODE=token` unless the operator chose),
    and the token file is kept 0600."""
    # before Ray is imported (its config reads the mode once, at import). A joined cluster's mode is its
    # operator's: a driver in token mode on a cluster without it cannot start actors there
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN") \
            and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        private_ray_token(create=not address)
    import ray

    if address:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
        mode = f"joined the Ray cluster at {address}"
    else:
        slots = slots or default_slots()
        ray.init(num_cpus=os.cpu_count() or 1, resources={SLOT_RESOURCE: slots}, include_dashboard=False,
                 namespace=NAMESPACE, logging_level=logging.WARNING)
        mode = f"embedded local Ray, {slots} conversation slots"
    total = int(ray.cluster_resources().get(SLOT_RESOURCE, 0))
    if total == 0:
        raise RuntimeError(f"no node of this Ray cluster declares a {SLOT_RESOURCE!r} resource: start nodes with "
                           f"ray start ... --resources '{{\"{SLOT_RESOURCE}\": N}}'")
    return {"mode": mode, "slots": total}


def start_simulator() -> tuple[Any, str] | None:
    """Offline: one simulator for every conversation (it serves many sessions; it is the test peer)."""
    from services.launcher import spawn

    target = openai_target()
    if not target.is_simulator:
        return None
    if os.environ.get("VOICEBUS_SIM_URL"):
        return None, target.base_url
    port = free_port()
    proc = spawn(["simulate", "--port", str(port), "--log-level", "WARNING"], dict(os.environ))
    deadline = time.monotonic() + SIMULATOR_READY_S
    while not port_listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the local simulator did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/v1"


async def serve(host: str, port: int, ssl_context: ssl.SSLContext | None, settings: dict[str, Any],
                stopped: asyncio.Event, operator: dict[str, Any]) -> None:
    from services.serving.serve.operator import HostPolicy, guard
    from services.stages.web.connections import guarded_runner

    front = FrontDoor({**settings, "client_offers": operator["client_offers"]}, twilio=operator.get("twilio"))
    app = front.app(middlewares=[guard(operator["token"], HostPolicy(host, operator["allowed_hosts"]))])
    runner = guarded_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(f"cannot serve on {host}:{port}: {exc.strerror} (--port 0 picks a free one)") from exc
    bound = runner.addresses[0][1]
    log.info(kv("serving", url=f"{'https' if ssl_context else 'http'}://{host}:{bound}/",
                status=f"{'https' if ssl_context else 'http'}://{host}:{bound}/status"))
    asyncio.ensure_future(front.reap_forever())
    await stopped.wait()
    log.info(kv("stopping", live=len(front.live)))
    started = time.monotonic()
    await front.stop_all()
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:  # the reaper, stage sets still warming up (stop_all stops what they start)
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await runner.cleanup()
    log.info(kv("stopped_all", seconds=round(time.monotonic() - started, 1)))


def run_serve(host: str, port: int, ssl_context: ssl.SSLContext | None, ray_address: str | None, slots: int | None,
              idle_timeout_s: float, root: Path, tools_args: list[str], prewarm: int, node_host: str | None,
              phone_voice: str | None, operator: dict[str, Any]) -> int:
    if port and not _can_bind(host, port):  # said now, not after Ray has started (seconds) for nothing
        print(f"voicebus serve: cannot serve on {host}:{port}: the port is taken (--port 0 picks a free one)",
              file=sys.stderr)
        return 2
    try:
        cluster = start_ray(ray_address, slots)
    except (RuntimeError, ConnectionError, ValueError) as exc:
        print(f"voicebus serve: {exc}", file=sys.stderr)
        return 2
    import ray  # after start_ray: Ray reads its auth mode once, at import

    simulator = None
    try:
        simulator = start_simulator()
        env = {"VOICEBUS_TRACE_DIR": str(root)}
        if simulator is not None:
            env["VOICEBUS_SIM_URL"] = simulator[1]
            log.warning(kv("offline", reason="OPENAI_API_KEY is not set", using=f"local simulator at {simulator[1]}"))
        settings = {"env": env, "idle_timeout_s": idle_timeout_s, "logger_args": ["--root", str(root)],
                    "tools_args": tools_args, "prewarm": prewarm, "media_host": node_host, "phone_voice": phone_voice,
                    "log_level": logging.getLevelName(logging.getLogger().level)}
        log.info(kv("ray", mode=repr(cluster["mode"]), slots=cluster["slots"]))
        loop = asyncio.new_event_loop()
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopped.set)
        loop.run_until_complete(serve(host, port, ssl_context, settings, stopped, operator))
        loop.close()
        return 0
    except RuntimeError as exc:
        print(f"voicebus serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if simulator is not None and simulator[0] is not None:
            from services.launcher import terminate

            terminate([simulator[0]], within_s=3.0)
        _shutdown_ray(ray)


def _can_bind(host: str, port: int) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no obstacle
            probe.bind((host, port))
        return True
    except OSError:
        return False


def _shutdown_ray(ray) -> None:
    """Leave the cluster, but not at the price of a hung exit: every conversation is stopped and its node's
    host killed by now, and a driver that exits is let go by Ray anyway (seen: shutdown taking over 10 s)."""
    import threading

    leaving = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    leaving.start()
    leaving.join(RAY_SHUTDOWN_S)
    if leaving.is_alive():
        log.warning(kv("ray_shutdown_slow", waited_s=RAY_SHUTDOWN_S, action="exiting without waiting"))
        logging.shutdown()
        os._exit(0)
