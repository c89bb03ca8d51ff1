"""`voicebus serve`'s front door: the page, offers, status; Ray places each conversation.

Every conversation reserves one `conversation` slot as a Ray placement group of one bundle: Ray's
scheduler picks a node with a free one, so no node is ever given more than it declared, and there
is no placement loop here. Its stage set then runs in that node's host (`services.serving.serve.node_host`,
one Ray actor a node, not one a conversation). When no slot is free the caller hears so at once
(HTTP 503 with Retry-After), never a hang; offers being placed are bounded too. Signalling passes
through here; media goes straight to the node that owns the conversation.

A reaper asks each node's host how its conversations are every half second: one that is over (hung
up, vanished, idle) is stopped and its slot freed; those of a host or node that is gone are
reported as dropped. A draining node's host is stopped once nothing runs there, so Ray can let the
node go. It also keeps
`prewarm` stage sets started and idle (as LiveKit keeps idle job processes): a caller is handed one
that already runs, so Connect -> live is one offer round trip, not six Python processes starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from common.config import new_session_id
from common.log import kv
from services.serving.serve.cluster import DrainError, conversation_nodes, drain_node, find_node
from services.serving.serve.conversation import SLOT_RESOURCE
from services.serving.serve.node_host import HOST_CONCURRENCY, NodeHost
from services.stages.phone import twiml
from services.stages.phone.line import TOKEN_PARAMETER, VOICE_PATH
from services.stages.web import reports
from services.stages.web.sdp import OfferError, parse_offer

STATIC = Path(__file__).resolve().parents[2] / "stages" / "web" / "static"
MAX_PENDING_OFFERS = 4  # placements under way at once; more are refused (a flood never queues up)
MAX_OFFER_BYTES = 256 * 1024
REAP_INTERVAL_S = 0.5
STATUS_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 8.0
START_TIMEOUT_S = 45.0  # placed and serving; past it the caller hears why (a node short of slots waits forever)
RETRY_AFTER_S = 5
BUSY_MESSAGE = "all lines are busy, try again shortly"
NO_CAPACITY_MESSAGE = ("no capacity: every node is draining or gone; no call can be taken until a node joins "
                       "(ray start ... --resources '{\"conversation\": N}')")
NAMESPACE = "voicebus"
ENDED_REMEMBERED = 1000
CONNECT_TIMES_REMEMBERED = 1000

log = logging.getLogger("voicebus.serve")


DEFAULT_CLIENT_OFFERS = (2, 30)  # offers one address may have in flight, and make a minute (--client-offers)


class ClientLimits:
    """Offers per client address: a few at once, a few tens a minute; past either, 429 with Retry-After.
    Junk counts too: one client alone cannot make the front door busy for everyone."""

    def __init__(self, in_flight: int, per_minute: int) -> None:
        self.in_flight, self.per_minute = in_flight, per_minute
        self.open: dict[str, int] = {}
        self.recent: dict[str, deque[float]] = {}

    MAX_TRACKED = 10_000  # addresses remembered at once: past it, those quiet for a minute are forgotten

    def admit(self, remote: str) -> int:
        """0 when admitted (and counted: call `done` after), else the seconds to wait."""
        now = time.monotonic()
        if len(self.recent) > self.MAX_TRACKED:  # many addresses (a spread flood) must not grow this forever
            for quiet in [a for a, times in self.recent.items() if not times or now - times[-1] > 60]:
                if not self.open.get(quiet):
                    del self.recent[quiet]
        recent = self.recent.setdefault(remote, deque())
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= self.per_minute:
            return max(1, int(61 - (now - recent[0])))
        if self.open.get(remote, 0) >= self.in_flight:
            return 1
        recent.append(now)
        self.open[remote] = self.open.get(remote, 0) + 1
        return 0

    def done(self, remote: str) -> None:
        left = self.open.get(remote, 0) - 1
        if left > 0:
            self.open[remote] = left
        else:
            self.open.pop(remote, None)
        if not self.recent.get(remote):
            self.recent.pop(remote, None)


@dataclass
class Placed:
    session: str
    node_host: Any  # the Ray actor that runs it (its node's NodeHost)
    slot: Any  # its placement group: the slot it holds
    node_id: str
    host: str  # where its web stage serves media
    placed_at: float = field(default_factory=time.time)
    status: dict[str, Any] = field(default_factory=dict)
    kind: str = "browser"  # or "phone" (a Twilio call)


class FrontDoor:
    def __init__(self, settings: dict[str, Any], twilio: dict[str, str] | None = None) -> None:
        import ray

        self.ray = ray
        self.settings = settings  # every node host gets these: no secret of the front door's goes in
        self.twilio = twilio or {}  # auth_token (signature check), url (what Twilio calls, behind a proxy)
        self.host_class = ray.remote(NodeHost)
        self.hosts: dict[str, Any] = {}  # node id -> its NodeHost actor
        self.live: dict[str, Placed] = {}
        self.pool: list[Placed] = []  # started, idle, waiting for a caller
        self.warming_sets: list[tuple[Any, str]] = []  # prewarmed sets still starting (at WARMING_NICE)
        self.starting_on: list[str] = []  # the node of each stage set being started (its host must stay)
        self.waiting_for_warm = 0  # callers waiting for one of them
        self.prewarm = int(settings.get("prewarm", 0))
        self.warming = 0
        self.pool_grew = asyncio.Event()  # a prewarmed stage set joined the pool
        self.ended: deque[dict[str, Any]] = deque(maxlen=ENDED_REMEMBERED)  # for /status and /call/SESSION
        self.pending = 0
        self.stopping = False
        self.counts = {"placed": 0, "busy_refused": 0, "flood_refused": 0, "bad_offers": 0, "ended": 0,
                       "dropped": 0, "failed_starts": 0, "waited_for_warming": 0,
                       "cold_starts": 0,  # a caller's own stage set started: none idle, none warming
                       "client_limited": 0, "no_capacity": 0,
                       "phone_placed": 0, "phone_busy": 0, "phone_bad_signature": 0}
        self.limits = ClientLimits(*settings.get("client_offers", DEFAULT_CLIENT_OFFERS))
        self.said_no_capacity = False
        self.report_secret = reports.new_secret()  # keys each caller's link to their own report
        self.connect_ms: deque[float] = deque(maxlen=CONNECT_TIMES_REMEMBERED)  # offer received -> answer sent

    # --- capacity ------------------------------------------------------------------------------
    def unheld_slots(self) -> int:
        """Slots of serving (not draining) nodes that none of this front door's conversations holds or is
        being given. Counted here, not from Ray's available resources: those trail an actor's creation,
        so a burst of offers would be refused (or counted twice). Which node a conversation gets is
        still Ray's choice."""
        serving = {node.node_id: node.slots for node in conversation_nodes(self.ray) if not node.draining}
        held = sum(1 for placed in [*self.live.values(), *self.pool] if placed.node_id in serving)
        return sum(serving.values()) - held - self.pending - self.warming

    def no_capacity(self) -> bool:
        """No node can ever take a call as things stand (all draining or gone): not "busy", which passes.
        Said in the log once each time it becomes so."""
        gone = not any(not node.draining for node in conversation_nodes(self.ray))
        if gone and not self.said_no_capacity:
            log.error(kv("no_capacity", reason=repr(NO_CAPACITY_MESSAGE)))
        self.said_no_capacity = gone
        return gone

    def free_slots(self) -> int:
        """How many more callers can be taken now: idle prewarmed stage sets, ones still starting (a caller
        waits for one rather than hear "busy" while a slot is being made ready), and slots nobody holds."""
        return len(self.pool) + self.warming + self.unheld_slots()

    def nodes(self) -> list[dict[str, Any]]:
        """Each node's slots, and its load as its stage sets last reported it: the 1-minute load average
        of the machine, and the CPU its live conversations used (% of one core, summed)."""
        used: dict[str, int] = {}
        conversations_cpu: dict[str, float] = {}
        load: dict[str, tuple[float, int]] = {}
        for placed in [*self.live.values(), *self.pool]:
            used[placed.node_id] = used.get(placed.node_id, 0) + 1
            if "node_load" in placed.status:
                load[placed.node_id] = (placed.status["node_load"], placed.status.get("node_cpus") or 0)
        for placed in self.live.values():
            conversations_cpu[placed.node_id] = conversations_cpu.get(placed.node_id, 0.0) + \
                float(placed.status.get("cpu_pct") or 0.0)
        return [{"node_id": node.node_id, "address": node.address, "slots": node.slots,
                 "used": used.get(node.node_id, 0), "free": 0 if node.draining else node.slots - used.get(node.node_id, 0),
                 "state": "draining" if node.draining else "serving",
                 "load_1m": load.get(node.node_id, (None, None))[0], "cpus": load.get(node.node_id, (None, None))[1],
                 "conversations_cpu_pct": round(conversations_cpu.get(node.node_id, 0.0), 1)}
                for node in conversation_nodes(self.ray)]

    # --- HTTP --------------------------------------------------------------------------------------
    def app(self, middlewares: list | None = None) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=middlewares or [])
        app.router.add_get("/", self.page)
        app.router.add_post("/offer", self.offer)
        app.router.add_post(VOICE_PATH, self.phone_call)
        app.router.add_get("/status", self.status)
        app.router.add_get("/call/{session}", self.call_state)
        app.router.add_get("/report/{session}", self.report)
        app.router.add_post("/drain", self.drain)
        app.router.add_static("/static/", STATIC)
        return app

    async def page(self, request: web.Request) -> web.StreamResponse:
        if self.free_slots() < 1:
            return web.Response(status=503, content_type="text/html", headers={"Retry-After": str(RETRY_AFTER_S)},
                                text=_busy_page(NO_CAPACITY_MESSAGE if self.no_capacity() else None))
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def _refuse(self, status: int, error: str, remote: str | None, counter: str) -> web.Response:
        self.counts[counter] += 1
        log.warning(kv("offer_refused", remote=remote, status=status, error=repr(error)))
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
        return web.json_response({"error": error}, status=status, headers=headers)

    async def offer(self, request: web.Request) -> web.Response:
        if self.stopping:
            return self._refuse(503, "this voicebus serve is shutting down", request.remote, "busy_refused")
        remote = request.remote or "?"
        wait_s = self.limits.admit(remote)
        if wait_s:
            self.counts["client_limited"] += 1
            log.warning(kv("offer_refused", remote=remote, status=429, error="per-client limit"))
            return web.json_response({"error": f"too many offers from {remote}: at most {self.limits.in_flight} at "
                                               f"once and {self.limits.per_minute} a minute"}, status=429,
                                     headers={"Retry-After": str(wait_s)})
        try:
            if self.pending >= MAX_PENDING_OFFERS:
                return self._refuse(503, f"too many calls being placed at once ({MAX_PENDING_OFFERS}); try again "
                                    "shortly", remote, "flood_refused")
            try:  # checked before a stage set is spent on it
                body = parse_offer(await request.read())
            except OfferError as exc:
                return self._refuse(400, f"malformed offer: {exc}", remote, "bad_offers")
            if self.free_slots() < 1:
                if self.no_capacity():
                    return self._refuse(503, NO_CAPACITY_MESSAGE, remote, "no_capacity")
                return self._refuse(503, BUSY_MESSAGE, remote, "busy_refused")
            self.pending += 1
            received = time.monotonic()
            try:
                return await self._place(body, remote, received)
            finally:
                self.pending -= 1
        finally:
            self.limits.done(remote)

    async def phone_call(self, request: web.Request) -> web.Response:
        """A Twilio number's voice webhook: a stage set of its own for the call (the phone stage, μ-law end to
        end), placed by Ray as a browser's is, answered with `<Connect><Stream>` to that node's phone stage.
        Busy or no capacity is said to the caller (`<Say>` then `<Hangup>`). With an auth token configured a
        request must carry Twilio's signature over the URL Twilio called (--twilio-url when a proxy is between)."""
        params = {name: str(value) for name, value in (await request.post()).items()}
        token = self.twilio.get("auth_token") or ""
        if token:
            signed_url = (self.twilio.get("url") or "").rstrip("/")
            signed_url = signed_url + VOICE_PATH if signed_url else str(request.url)
            if not twiml.signature_ok(token, signed_url, params, request.headers.get(twiml.SIGNATURE_HEADER, "")):
                self.counts["phone_bad_signature"] += 1
                log.warning(kv("phone_refused", remote=request.remote, reason="bad Twilio signature",
                               call_sid=params.get("CallSid", "")[:40]))
                return web.Response(status=403, text="signature does not match")
        call_sid = params.get("CallSid", "")[:64]
        if self.stopping or self.free_slots() < 1:
            self.counts["phone_busy"] += 1
            message = NO_CAPACITY_MESSAGE if self.no_capacity() else BUSY_MESSAGE
            log.warning(kv("phone_refused", remote=request.remote, call_sid=call_sid, reason=repr(message)))
            return web.Response(text=twiml.busy(f"Sorry, {message}."), content_type=twiml.CONTENT_TYPE)
        if self.unheld_slots() < 1 and self.pool:  # the free slot is an idle browser set's: the call takes it
            idle = self.pool.pop()
            self._release(idle.session, idle.node_host, idle.slot)
        self.pending += 1
        received = time.monotonic()
        try:
            placed = await self._start_one(kind="phone")
            stream = await placed.node_host.phone_stream.remote(placed.session)
        except Exception as exc:  # noqa: BLE001 - said to the caller, logged for the operator
            self.counts["failed_starts"] += 1
            log.error(kv("conversation_failed", kind="phone", error=repr(str(exc)[:300] or type(exc).__name__)))
            return web.Response(text=twiml.busy("Sorry, the call could not be connected."),
                                content_type=twiml.CONTENT_TYPE)
        finally:
            self.pending -= 1
        placed.placed_at = time.time()
        self.live[placed.session] = placed
        self.counts["phone_placed"] += 1
        self.connect_ms.append(round(1000 * (time.monotonic() - received), 1))  # webhook received -> TwiML answered
        log.info(kv("conversation_placed", kind="phone", session=placed.session, node=placed.node_id[:12],
                    call_sid=call_sid, connect_ms=round(1000 * (time.monotonic() - received), 1)))
        return web.Response(text=twiml.connect_stream(stream["url"], {TOKEN_PARAMETER: stream["token"],
                                                                      "session": placed.session}),
                            content_type=twiml.CONTENT_TYPE)

    def host_on(self, node_id: str) -> Any:
        """The node's host actor, started the first time the node is needed (pinned there)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node_id not in self.hosts:
            self.hosts[node_id] = self.host_class.options(
                namespace=NAMESPACE, num_cpus=0, max_concurrency=HOST_CONCURRENCY, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(self.settings)
            log.info(kv("node_host_started", node=node_id[:12]))
        return self.hosts[node_id]

    async def _start_one(self, prewarm: bool = False, kind: str = "browser") -> Placed:
        """A new conversation's stage set on a node Ray chooses, once it serves."""
        from ray.util.placement_group import placement_group, placement_group_table

        session = new_session_id()
        deadline = time.monotonic() + START_TIMEOUT_S
        slot = placement_group([{SLOT_RESOURCE: 1}], name=f"voicebus-{session}")
        node_host, node_id, warming = None, "", None
        try:
            await asyncio.wait_for(slot.ready(), START_TIMEOUT_S)
            node_id = placement_group_table(slot)["bundles_to_node_id"][0]
            self.starting_on.append(node_id)
            node_host = self.host_on(node_id)
            await asyncio.wait_for(node_host.start.remote(session, prewarm, kind),
                                   max(0.1, deadline - time.monotonic()))
            if prewarm:
                warming = (node_host, session)
                self.warming_sets.append(warming)
            where = await asyncio.wait_for(node_host.ready.remote(session), max(0.1, deadline - time.monotonic()))
        except BaseException as exc:
            lost = _actor_lost(exc)
            self._release(session, None if lost else node_host, slot)
            if node_id and lost:
                self._forget_host(node_id, node_host)
            raise
        finally:
            if node_id:
                self.starting_on.remove(node_id)
            if warming is not None:
                self.warming_sets.remove(warming)
        return Placed(session, node_host, slot, where["node_id"], where["host"], kind=kind)

    def _release(self, session: str, node_host: Any, slot: Any) -> None:
        """Stop a stage set without waiting (if its host still runs) and give its slot back."""
        from ray.util.placement_group import remove_placement_group

        if node_host is not None:
            with contextlib.suppress(Exception):  # its host is gone: so are its processes
                node_host.stop.remote(session)
        with contextlib.suppress(Exception):  # already removed
            remove_placement_group(slot)

    def _forget_host(self, node_id: str, node_host: Any) -> None:
        """A host that died (or whose node did): the next conversation there starts a new one."""
        if self.hosts.get(node_id) is node_host:
            del self.hosts[node_id]

    async def _place(self, body: dict[str, Any], remote: str | None, received: float) -> web.Response:
        placed, answer = None, None
        offered = received  # when the offer went to a stage set: before it, the caller waited for one
        # no idle stage set, but one is warming up that no other caller waits for: it is this caller's
        # (hurried to full weight), rather than one more start beside it: on a busy machine the starts
        # share the CPU, and four at once took 35 s where one took 10
        if not self.pool and self.warming > self.waiting_for_warm and not self.stopping:
            self.waiting_for_warm += 1
            self.counts["waited_for_warming"] += 1
            try:
                # the first started is nearest ready; one per waiting caller leaves background work
                for node_host, warming_session in self.warming_sets[:self.waiting_for_warm]:
                    node_host.hurry.remote(warming_session)
                while not self.pool and self.warming and not self.stopping:
                    self.pool_grew.clear()
                    try:
                        await asyncio.wait_for(self.pool_grew.wait(), START_TIMEOUT_S)
                    except TimeoutError:
                        break
            finally:
                self.waiting_for_warm -= 1
        while self.pool and answer is None:  # a prewarmed one, unless its node went away meanwhile
            candidate = self.pool.pop(0)
            try:
                offered = time.monotonic()
                answer = await candidate.node_host.offer.remote(candidate.session, body)
                placed = candidate
                # its replacement starts once this offer is answered, not at the next reap (up to
                # REAP_INTERVAL_S and a round of statuses later), so callers coming fast behind find one
                # ready; not before the answer, whose caller would wait on the start's Ray calls
                asyncio.get_running_loop().call_soon(self.top_up)
            except Exception as exc:  # noqa: BLE001 - RayActorError: that idle stage set is gone
                log.warning(kv("prewarmed_lost", session=candidate.session, error=repr(str(exc)[:200])))
                self._release(candidate.session, candidate.node_host, candidate.slot)
        if placed is None:
            self.counts["cold_starts"] += 1
            try:
                placed = await self._start_one()
                offered = time.monotonic()
                answer = await placed.node_host.offer.remote(placed.session, body)
            except Exception as exc:  # noqa: BLE001 - a stage set that cannot start, a node lost meanwhile
                self.counts["failed_starts"] += 1
                log.error(kv("conversation_failed", error=repr(str(exc)[:300] or type(exc).__name__)))
                if placed is not None:
                    self._release(placed.session, placed.node_host, placed.slot)
                return web.json_response({"error": f"the conversation could not start: "
                                                   f"{str(exc)[:300] or type(exc).__name__}"}, status=500)
        assert answer is not None
        session = placed.session
        if answer["status"] != 200:
            self.counts["bad_offers"] += 1
            if answer["status"] == 400:  # refused before it took a caller: the set is as it was, for the next
                self.pool.insert(0, placed)
            else:
                self._release(placed.session, placed.node_host, placed.slot)
            return web.json_response(answer["body"], status=answer["status"])
        placed.placed_at = time.time()
        self.live[session] = placed
        self.counts["placed"] += 1
        connect_ms = round(1000 * (time.monotonic() - received), 1)
        self.connect_ms.append(connect_ms)
        took = answer.get("took_ms") or {}
        log.info(kv("conversation_placed", session=session, node=placed.node_id[:12], host=placed.host,
                    remote=remote, connect_ms=connect_ms, waited_ms=round(1000 * (offered - received), 1),
                    web_answer_ms=took.get("web_answer")))
        return web.json_response({**answer["body"], "session": session, "node_id": placed.node_id,
                                  "report_url": reports.report_url(self.report_secret, session)})

    async def call_state(self, request: web.Request) -> web.Response:
        """What became of one call: the page and `voicebus call` ask, so a lost node's callers are told."""
        session = request.match_info["session"]
        if session in self.live:
            return web.json_response({"session": session, "state": "live"})
        ended = next((e for e in reversed(self.ended) if e["session"] == session), None)
        if ended is None:
            return web.json_response({"error": "no such call here"}, status=404)
        return web.json_response({"session": session, "state": "dropped" if ended["dropped"] else "ended",
                                  "reason": ended["reason"]})

    async def report(self, request: web.Request) -> web.StreamResponse:
        """A caller's report (the link their page was given), from the session directory its logger named."""
        session = request.match_info["session"]
        live = self.live.get(session)
        ended = next((e for e in reversed(self.ended) if e["session"] == session), None)
        where = live.status.get("report") if live is not None else (ended or {}).get("report")
        return reports.report_response(request, self.report_secret, where)

    async def drain(self, request: web.Request) -> web.Response:
        """Mark a node draining: no new conversations there, its live ones finish, then Ray stops it."""
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict) or not isinstance(body.get("node"), str):
                raise ValueError('expected JSON {"node": "NODE_ID"}')
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
            return web.json_response({"error": f"malformed drain request: {type(exc).__name__}: {str(exc)[:200]}"},
                                     status=400)
        try:
            node = find_node(conversation_nodes(self.ray), body["node"])
            idle = [placed for placed in self.pool if placed.node_id == node.node_id]
            drain_node(self.ray, node)
        except DrainError as exc:
            log.warning(kv("drain_refused", node=repr(body["node"][:64]), error=repr(str(exc))))
            return web.json_response({"error": str(exc)}, status=exc.status)
        await self._stop_idle(idle)
        live = [p.session for p in self.live.values() if p.node_id == node.node_id]
        log.info(kv("node_draining", node=node.node_id[:12], live=len(live), prewarmed_stopped=len(idle)))
        return web.json_response({"node_id": node.node_id, "live": live, "prewarmed_stopped": len(idle),
                                  "message": f"no new conversations on {node.node_id[:12]}; {len(live)} live "
                                             f"finish, then Ray stops the node"})

    async def _stop_idle(self, idle: list[Placed]) -> None:
        """Prewarmed stage sets on a draining node: nobody is in them, and they would keep the node busy."""
        for placed in idle:
            if placed in self.pool:
                self.pool.remove(placed)
        await asyncio.gather(*(self._stop_one(placed) for placed in idle), return_exceptions=True)

    async def status(self, request: web.Request) -> web.Response:
        report = {"warning": NO_CAPACITY_MESSAGE if self.no_capacity() else "", "nodes": self.nodes(), "conversations": [
            {"session": p.session, "kind": p.kind, "node_id": p.node_id, "host": p.host,
             "age_s": round(time.time() - p.placed_at, 1),
             "turns": p.status.get("turns", 0), "responses": p.status.get("responses", 0),
             "last_latency_ms": p.status.get("last_latency_ms"),
             "report": p.status.get("report", ""), "restarts": p.status.get("restarts", 0),
             "pid": p.status.get("pid"), "stage_pids": p.status.get("stage_pids"), "cpu_pct": p.status.get("cpu_pct"),
             "bus": p.status.get("bus")}
            for p in self.live.values()], "prewarmed": len(self.pool), "warming": self.warming,
            "ended": list(self.ended)[-20:], "counts": self.counts, "pending": self.pending,
            "connect_ms": list(self.connect_ms)[-100:]}
        wants = request.query.get("format", "")
        if wants not in ("", "json", "html"):
            return web.json_response({"error": "unknown format: use ?format=json or ?format=html"}, status=400)
        if wants == "json" or (not wants and "application/json" in request.headers.get("Accept", "")):
            return web.json_response(report)
        return web.Response(content_type="text/html", text=_status_page(report))

    # --- the reaper ------------------------------------------------------------------------------
    async def reap_forever(self) -> None:
        while not self.stopping:
            await self.reap()
            self.top_up()
            await asyncio.sleep(REAP_INTERVAL_S)

    def top_up(self) -> None:
        """Start idle stage sets until `prewarm` are ready, in slots nobody holds (callers first); and a host
        on every serving node, so that a conversation's start there does not wait for a Ray worker."""
        for node in conversation_nodes(self.ray):
            if not node.draining and not self.stopping:
                self.host_on(node.node_id)
        while not self.stopping and len(self.pool) + self.warming < self.prewarm and self.unheld_slots() >= 1:
            self.warming += 1
            asyncio.ensure_future(self._warm_one())

    async def _warm_one(self) -> None:
        try:
            placed = await self._start_one(prewarm=True)
        except Exception as exc:  # noqa: BLE001 - said, and tried again on the next round
            self.counts["failed_starts"] += 1
            log.error(kv("prewarm_failed", error=repr(str(exc)[:300] or type(exc).__name__)))
            return
        finally:
            self.warming -= 1
            self.pool_grew.set()  # waiting callers look again (a failed start frees its slot)
        if self.stopping:
            await self._stop_one(placed)
        else:
            self.pool.append(placed)
            self.pool_grew.set()

    async def reap(self) -> None:
        nodes = conversation_nodes(self.ray)
        draining = {node.node_id for node in nodes if node.draining}
        if self.pool and draining:  # a drain made with Ray's own tools (ray drain-node) is honoured too
            await self._stop_idle([placed for placed in self.pool if placed.node_id in draining])
        # asked of the conversations placed before the question (one placed meanwhile is not missing)
        asked = {node_id: [p for p in [*self.live.values(), *self.pool] if p.node_host is node_host]
                 for node_id, node_host in self.hosts.items()}
        answers = await asyncio.gather(*(asyncio.wait_for(self.hosts[node_id].statuses.remote(), STATUS_TIMEOUT_S)
                                         for node_id in asked), return_exceptions=True)
        hung_up: list[Placed] = []
        for (node_id, placed_there), answer in zip(asked.items(), answers, strict=True):
            if isinstance(answer, TimeoutError):
                continue  # busy, not gone: asked again next round
            if isinstance(answer, BaseException):
                if _actor_lost(answer):  # its node (or its process) is gone
                    self._host_gone(node_id, placed_there, f"line dropped: {type(answer).__name__}")
                else:  # the call failed, not the host: asked again next round
                    log.warning(kv("statuses_failed", node=node_id[:12], error=repr(str(answer)[:200])))
                continue
            for placed in placed_there:
                if placed.session not in answer:
                    if placed.session in self.live:
                        self._end(placed, "line dropped: its stage set is gone", dropped=True)
                    continue
                if "status_error" in answer[placed.session]:
                    continue  # it runs, its status failed this round (the host logged why)
                placed.status = answer[placed.session]
                if placed.session in self.live and placed.status.get("ended"):
                    hung_up.append(placed)
        # stopped side by side: callers who hang up together give their slots back together, not one
        # stop (its stages' exit) after another
        await asyncio.gather(*(self._stop_one(placed) for placed in hung_up))
        for placed in hung_up:
            self._end(placed, placed.status["ended"])
        for node_id in draining & set(self.hosts):  # nothing runs there any more: let Ray stop the node
            if not any(p.node_id == node_id for p in [*self.live.values(), *self.pool]) \
                    and node_id not in self.starting_on:
                self.ray.kill(self.hosts.pop(node_id))
                log.info(kv("node_host_stopped", node=node_id[:12], reason="draining, idle"))

    def _host_gone(self, node_id: str, placed_there: list[Placed], reason: str) -> None:
        """Its conversations are dropped, its idle sets forgotten, their slots given back (else Ray would
        place the reservations of a lost node again elsewhere)."""
        self._forget_host(node_id, self.hosts.get(node_id))
        log.log(logging.WARNING if placed_there else logging.INFO,
                kv("node_host_lost", node=node_id[:12], conversations=len(placed_there), reason=repr(reason)))
        for placed in placed_there:
            self._release(placed.session, None, placed.slot)
            if placed in self.pool:
                self.pool.remove(placed)
            elif placed.session in self.live:
                self._end(placed, reason, dropped=True)

    async def _stop_one(self, placed: Placed) -> None:
        try:
            stopped = await asyncio.wait_for(placed.node_host.stop.remote(placed.session), STOP_TIMEOUT_S)
            placed.status = stopped or placed.status
        except Exception as exc:  # noqa: BLE001 - its slot is given back anyway
            log.warning(kv("stop_failed", session=placed.session, error=repr(str(exc)[:200])))
        self._release(placed.session, None, placed.slot)

    def _end(self, placed: Placed, reason: str, dropped: bool = False) -> None:
        self.live.pop(placed.session, None)
        self.counts["dropped" if dropped else "ended"] += 1
        self.ended.append({"session": placed.session, "kind": placed.kind, "node_id": placed.node_id, "reason": reason,
                           "dropped": dropped,
                           "turns": placed.status.get("turns", 0), "report": placed.status.get("report", ""),
                           "restarts": placed.status.get("restarts", 0),
                           "age_s": round(time.time() - placed.placed_at, 1)})
        log.log(logging.WARNING if dropped else logging.INFO,
                kv("conversation_ended", session=placed.session, reason=repr(reason), turns=placed.status.get("turns")))

    async def stop_all(self) -> None:
        self.stopping = True
        idle, self.pool = self.pool, []
        await asyncio.gather(*(self._stop_one(p) for p in [*self.live.values(), *idle]), return_exceptions=True)
        for placed in list(self.live.values()):
            self._end(placed, "serve stopped")
        for node_host in self.hosts.values():  # what a start under way left there dies with its host
            self.ray.kill(node_host)
        self.hosts.clear()


def _actor_lost(exc: BaseException) -> bool:
    """The actor is dead (its process or its node), not just unreachable for a moment."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, RayActorError) and not isinstance(exc, ActorUnavailableError)


def _busy_page(no_capacity: str | None = None) -> str:
    said = html.escape(no_capacity[0].upper() + no_capacity[1:]) if no_capacity else \
        f"All lines are busy: every conversation slot is taken. Try again shortly (in about {RETRY_AFTER_S} s)."
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>voicebus: all lines busy</title>"
            "<link rel='stylesheet' href='/static/page.css'></head><body><header><h1>voicebus</h1>"
            f"<span class='status error'>{'no capacity' if no_capacity else 'busy'}</span></header>"
            f"<p id='busy' class='error'>{said}</p></body></html>")


NODE_ID_SHOWN = 12  # of Ray's 56 hex digits: unique in any cluster we run, and what `serve drain` takes


def _status_page(report: dict[str, Any]) -> str:
    def cell(column: str, value: Any) -> str:
        text = html.escape(str(value if value is not None else ""))
        if column == "node_id" and len(text) > NODE_ID_SHOWN:  # the whole id on hover, and for copying
            return f"<td title='{text}'><code>{text[:NODE_ID_SHOWN]}</code></td>"
        return f"<td>{text}</td>"

    def table(rows: list[dict[str, Any]], columns: list[str], empty: str) -> str:
        if not rows:
            return f"<p class='empty'>{html.escape(empty)}</p>"
        head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(cell(c, row.get(c, "")) for c in columns) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    counts = [{"counter": name.replace("_", " "), "count": value} for name, value in report["counts"].items()]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><meta http-equiv='refresh' content='1'>"
            "<title>voicebus serve: status</title><link rel='stylesheet' href='/static/page.css'></head><body>"
            "<header><h1>voicebus serve</h1></header>"
            + (f"<p id='warning' class='error'>{html.escape(report['warning'])}</p>" if report.get("warning") else "")
            + f"<p>prewarmed and idle: {report['prewarmed']} (+{report['warming']} starting); placing now: "
            f"{report['pending']}</p>"
            + "<h2>Nodes</h2>"
            + table(report["nodes"], ["node_id", "address", "state", "slots", "used", "free", "load_1m", "cpus",
                                      "conversations_cpu_pct"], "no node")
            + "<h2>Live conversations</h2>"
            + table(report["conversations"], ["session", "kind", "node_id", "age_s", "turns", "last_latency_ms",
                                              "cpu_pct", "report"], "none")
            + "<h2>Ended</h2>" + table(report["ended"], ["session", "kind", "reason", "turns", "age_s", "report"],
                                       "none yet")
            + "<h2>Counts</h2>" + table(counts, ["counter", "count"], "")
            + "</body></html>")
