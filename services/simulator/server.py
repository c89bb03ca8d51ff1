"""The simulator's HTTP server: one aiohttp app, paths as the OpenAI API has them.

    GET  /v1/realtime?model=...     websocket, GA protocol (beta with `OpenAI-Beta: realtime=v1`)
    POST /v1/chat/completions       chat completions with audio output
    GET  /healthz                   liveness, and what this server is
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import WSMsgType, web

from common.log import kv
from common.speech import TranscriberPool
from services.simulator.chat import api_error, chat_completions
from services.simulator.faults import Fault, FaultBudget
from services.simulator.realtime import Options, RealtimeConnection

MAX_WS_MESSAGE = 32 * 1024 * 1024  # above the API's 15 MiB append limit, so that limit is answered politely
log = logging.getLogger("voicebus.simulator")


def _authorized(request: web.Request, api_key: str | None) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        return False
    return api_key is None or header[7:].strip() == api_key


def _unauthorized() -> web.Response:
    return api_error(401, "Incorrect API key provided. (voicebus simulator)", code="invalid_api_key")


def build_app(options: Options, faults: list[Fault], api_key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_WS_MESSAGE)
    budget = FaultBudget()
    transcriber = TranscriberPool()
    app["budget"] = budget
    app["transcriber"] = transcriber

    async def realtime(request: web.Request) -> web.StreamResponse:
        if not _authorized(request, api_key):
            return _unauthorized()
        model = request.query.get("model")
        if not model:
            return api_error(400, "Missing required parameter: 'model'.", param="model")
        protocol = "beta" if request.headers.get("OpenAI-Beta", "").startswith("realtime=v1") else "ga"
        try:
            connection_faults = list(faults)
            if "fault" in request.query:
                count = request.query.get("fault_count")
                connection_faults.append(Fault(request.query["fault"],
                                               after_deltas=int(request.query.get("fault_after", 3)),
                                               delay_ms=int(request.query.get("fault_delay_ms", 200)),
                                               count=int(count) if count else None))
        except ValueError as exc:
            return api_error(400, str(exc), param="fault")
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, autoping=True)
        await ws.prepare(request)

        def drop() -> None:
            if request.transport is not None:
                request.transport.close()

        connection = RealtimeConnection(ws.send_str, drop, protocol, model, options, connection_faults, budget,
                                        transcriber)
        try:
            await connection.start()
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await connection.on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await connection.error("Binary frames are not supported: send JSON text events.",
                                           code="invalid_json")
                elif message.type == WSMsgType.ERROR:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            connection.close()
            log.info(kv("session_end", id=connection.config.id))
        return ws

    async def chat(request: web.Request) -> web.StreamResponse:
        if not _authorized(request, api_key):
            return _unauthorized()
        return await chat_completions(request, options.replies)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "server": "voicebus simulator (not OpenAI)"})

    app.router.add_get("/v1/realtime", realtime)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    return app


def run_simulator(host: str, port: int, options: Options, faults: list[Fault], api_key: str | None,
                  listen_fd: int | None = None) -> int:
    app = build_app(options, faults, api_key)
    transcriber: TranscriberPool = app["transcriber"]

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(fileno=listen_fd) if listen_fd is not None else _bind(host, port)
        site = web.SockSite(runner, sock, shutdown_timeout=1.0)
        await site.start()
        bound = sock.getsockname()[1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # before we say we listen: a stop right after is clean
            loop.add_signal_handler(sig, stop.set)
        print(f"voicebus simulator (local, not OpenAI) listening on http://{host}:{bound}/v1", flush=True)
        log.info(kv("listening", host=host, port=bound, faults=",".join(f.kind for f in faults) or "-",
                    pace=options.pace))
        await stop.wait()
        await runner.cleanup()

    transcriber.warm()  # the ASR workers up and their model loaded before we say we are ready
    try:
        asyncio.run(serve())
    except BindError as exc:
        log.error(kv("listen_failed", error=repr(str(exc))))
        return 2
    finally:
        transcriber.close()
    return 0


class BindError(RuntimeError):
    pass


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror} (another simulator running? --port 0 "
                        "picks a free port; under honcho, set VOICEBUS_SIM_PORT for every process, in .env)") from exc
    return sock
