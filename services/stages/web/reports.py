"""A caller's own report, at a link on their page: `/report/SESSION?key=K`, served by `web` or `serve`.

The logger writes report.html into the session's directory as the conversation closes (see
services/stages/logger/stage.py). The link's key is an HMAC of the session under a secret only the server
holds, handed to the page that had that conversation (in its hello, or in `serve`'s answer to its
offer): knowing another caller's session id is not enough to read their conversation.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
from pathlib import Path

from aiohttp import web

KEY_CHARS = 32


def new_secret() -> bytes:
    return os.urandom(32)


def report_key(secret: bytes, session: str) -> str:
    return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()[:KEY_CHARS]


def report_url(secret: bytes, session: str) -> str:
    return f"/report/{session}?key={report_key(secret, session)}"


def report_response(request: web.Request, secret: bytes, session_dir: str | Path | None) -> web.StreamResponse:
    """The report of the session named in the path, for the holder of its key; 404 for anyone else (the
    same answer as for a session that does not exist: nothing to learn by guessing)."""
    session = request.match_info.get("session", "")
    if not hmac.compare_digest(request.query.get("key", "").encode(), report_key(secret, session).encode()) \
            or not session_dir:
        return web.json_response({"error": "no such report"}, status=404)
    page = Path(session_dir) / "report.html"
    if not page.is_file():  # the conversation is still on, or its report is being written
        return web.Response(status=202, content_type="text/html", headers={"Cache-Control": "no-store"},
                            text="<!doctype html><meta charset='utf-8'><meta http-equiv='refresh' content='1'>"
                                 "<title>voicebus report</title><p>The report of "
                                 f"<code>{html.escape(session)}</code> is written when the call ends; this page "
                                 "reloads until it is there.</p>")
    return web.FileResponse(page, headers={"Cache-Control": "no-store", "Content-Type": "text/html; charset=utf-8"})
