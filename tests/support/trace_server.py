"""A loopback W&B/Weave trace server for tests: answers what the real weave client calls, records it all.

Endpoints: /graphql (viewer, project, upsertModel), /traces/server_info, /traces/obj/create,
/traces/table/create, /traces/file/create (multipart), /traces/v2/{entity}/{project}/calls/complete (batched),
/traces/v2/.../call/start and call/end (calls kept open), /traces/feedback/batch/create and
/traces/calls/stream_query (JSON lines), so uploads can be read back; and Weave's GenAI ingest
(/traces/agents/otel/v1/traces, OTLP protobuf over HTTP, the Agents view's source), whose spans are
decoded into `spans`. `mode` makes it misbehave: "500", "429" or "hang".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

from common.ports import free_port

FAKE_WANDB_KEY = "local-wandb-test-key-" + "0" * 19  # 40 characters, like a real key


@dataclass
class Recorded:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def decode_otlp(body: bytes, encoding: str = "") -> list[dict]:
    """An OTLP/HTTP protobuf trace export as plain dicts (ids in hex, attributes as Python values)."""
    import gzip
    import zlib

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append({"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                            "attributes": {kv.key: _any_value(kv.value) for kv in span.attributes},
                            "status": span.status.code, "status_message": span.status.message,
                            "scope": scope_spans.scope.name, "resource": resource})
    return out


class LoopbackTraceServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mode = "ok"
        self.requests: list[Recorded] = []
        self.calls: dict[str, dict] = {}
        self.files: dict[str, dict] = {}  # digest (the client's expected one, when it sends it) -> the file
        self.objects: dict[str, dict] = {}  # digest -> the object, as `weave://.../object/NAME:DIGEST` names it
        self.tables: list[list[dict]] = []
        self.feedback: list[dict] = []  # scores, as the weave client attaches them to calls
        self.spans: dict[str, dict] = {}  # span id (hex) -> the span, decoded from OTLP (a re-send overwrites)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"WANDB_BASE_URL": self.url, "WF_TRACE_SERVER_URL": f"{self.url}/traces", "WANDB_API_KEY": FAKE_WANDB_KEY,
                "WANDB_ENTITY": "tester", "WEAVE_USE_SERVER_CACHE": "false", "WANDB_SILENT": "true"}

    def of(self, suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith(suffix)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, body,
                                      {k: v for k, v in request.headers.items() if k.lower() != "authorization"}))
        if self.mode == "hang":
            await self._release.wait()  # until stop(): a server that never answers
        if self.mode in ("500", "429"):
            return web.json_response({"detail": "simulated failure"}, status=int(self.mode),
                                     headers={"Retry-After": "1"} if self.mode == "429" else None)
        path = request.path
        if path.endswith("/server_info"):
            return web.json_response({"min_required_weave_python_version": "0.0.1", "trace_server_version": "99.0.0"})
        if path == "/graphql":
            variables = json.loads(body or b"{}").get("variables", {})
            name, entity = variables.get("name", "voicebus"), variables.get("entityName", variables.get("entity", "tester"))
            return web.json_response({"data": {
                "project": {"id": "p1", "name": name, "entity": {"id": "e1", "name": entity}},
                "upsertModel": {"inserted": True, "model": {"id": "p1", "name": name, "entityName": entity,
                                                            "entity": {"name": entity}}},
                "viewer": {"id": "u1", "username": "tester", "entity": "tester",
                           "defaultEntity": {"id": "e1", "name": "tester"}, "teams": {"edges": []}}}})
        if path.endswith("/obj/create"):
            obj = json.loads(body).get("obj", {})
            digest = obj.get("expected_digest") or hashlib.sha256(body).hexdigest()[:43]
            self.objects[digest] = obj
            return web.json_response({"digest": digest})
        if path.endswith("/table/create"):
            rows = json.loads(body).get("table", {}).get("rows", [])
            self.tables.append(rows)
            return web.json_response({"digest": hashlib.sha256(body).hexdigest()[:43],
                                      "row_digests": [hashlib.sha256(json.dumps(row, sort_keys=True).encode())
                                                      .hexdigest()[:43] for row in rows]})
        if path.endswith("/file/create"):
            form = self._parse_multipart(request, body)
            digest = form.get("expected_digest") or hashlib.sha256(form.get("file", {}).get("data", b"")).hexdigest()[:43]
            self.files[digest] = form.get("file", {})
            return web.json_response({"digest": digest})
        if path.endswith("/otel/v1/traces"):
            for span in decode_otlp(body, request.headers.get("Content-Encoding", "")):
                self.spans[span["span_id"]] = {**span, "project_id": request.headers.get("project_id")}
            return web.Response(body=b"", content_type="application/x-protobuf")
        if path.endswith("/calls/complete"):
            for call in json.loads(body).get("batch", []):
                self.calls[call["id"]] = call
            return web.json_response({})
        if path.endswith("/call/start"):  # a call kept open (Evaluation.evaluate), v2
            start = json.loads(body).get("start", {})
            self.calls[start["id"]] = start
            return web.json_response({"id": start["id"], "trace_id": start.get("trace_id")})
        if path.endswith("/call/end"):
            end = json.loads(body).get("end", {})
            self.calls.setdefault(end["id"], {"id": end["id"]}).update(end)
            return web.json_response({})
        if path.endswith("/feedback/batch/create"):
            batch = json.loads(body).get("batch", [])
            self.feedback.extend(batch)
            return web.json_response({"res": [{"id": f"f{len(self.feedback) - len(batch) + i}", "created_at":
                                               "2026-01-01T00:00:00Z", "wb_user_id": "u1", "payload": {}}
                                              for i in range(len(batch))]})
        if path.endswith("/calls/stream_query"):
            wanted = set((json.loads(body).get("filter") or {}).get("call_ids") or self.calls)
            lines = [json.dumps(self.calls[i]) for i in wanted if i in self.calls]
            return web.Response(text="\n".join(lines) + ("\n" if lines else ""), content_type="application/jsonl")
        return web.json_response({})

    @staticmethod
    def _parse_multipart(request: web.Request, body: bytes) -> dict:
        """multipart/form-data -> {name: text, or {filename, content_type, data}} (stdlib email parser)."""
        from email import policy
        from email.parser import BytesParser

        head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form: dict = {}
        for part in BytesParser(policy=policy.default).parsebytes(head + body).iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if part.get_filename():
                form[name] = {"filename": part.get_filename(), "content_type": part.get_content_type(), "data": data}
            else:
                form[name] = data.decode(errors="replace")
        return form

    def start(self) -> LoopbackTraceServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._release = asyncio.Event()
            app = web.Application(client_max_size=256 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "trace server did not start"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop = None
