"""The websocket to the Realtime API, owned by one thread that connects, reads and reconnects.

The stage's runner thread only sends (websocket-client serialises sends with its own lock). What
the socket thread learns goes to the stage inbox as `SocketEvent`s. Reconnects back off
exponentially with jitter; a session older than `max_session_s` is renewed before the server's
60-minute limit cuts it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import websocket

from common.log import kv

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0
CONNECT_TIMEOUT_S = 10.0
QUIET_ATTEMPTS = 3
PAUSED_REASON = "conversation ended"

log = logging.getLogger("voicebus.gateway")


@dataclass(frozen=True)
class SocketEvent:
    kind: str  # "connected" | "message" | "closed"
    text: str = ""
    t_recv_ns: int = 0
    reason: str = ""
    attempt: int = 0


class RealtimeSocket:
    def __init__(self, url: str, headers: list[str], put: Callable[[SocketEvent], object],
                 max_session_s: float = 55 * 60) -> None:
        self.url = url
        self._headers = headers  # holds the API key: never logged, never published
        self._put = put
        self.max_session_s = max_session_s
        self._ws: websocket.WebSocket | None = None
        self._stop = threading.Event()
        self._renew = threading.Event()
        self._paused = threading.Event()  # between conversations: no server session at all
        self._closed_for_pause = threading.Event()  # set by pause(), cleared by the reader that saw it
        self._thread = threading.Thread(target=self._run, name="realtime-socket", daemon=True)
        self.connected = False
        self.connects = 0

    def start(self) -> None:
        self._thread.start()

    def send(self, text: str) -> bool:
        ws = self._ws
        if ws is None or not self.connected:
            return False
        try:
            ws.send(text)
            return True
        except (websocket.WebSocketException, OSError) as exc:
            log.warning(kv("send_failed", error=type(exc).__name__))
            self._close_current()
            return False

    def renew(self) -> None:
        """Close and reconnect now (the session time limit; a new conversation on a used session)."""
        self._renew.set()
        self._close_current()

    def pause(self) -> None:
        """Close and stay closed until `resume()`: a conversation ended, the next one gets a fresh session."""
        self._paused.set()
        self._closed_for_pause.set()  # a resume() right after must not make this close look like a drop
        self._close_current()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def _close_current(self) -> None:
        ws = self._ws
        if ws is not None:
            try:
                ws.close(timeout=0.2)
            except Exception:  # closing a broken socket can fail in many ways; it is gone either way
                pass

    def _run(self) -> None:
        attempt = 0
        backoff = BACKOFF_START_S
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.02)
                attempt, backoff = 0, BACKOFF_START_S
                continue
            attempt += 1
            try:
                # utf-8 is checked by json.loads anyway (bad text becomes rt.unknown); skipping
                # websocket-client's own pure-Python check saves ~0.3 % of a core while audio streams
                ws = websocket.create_connection(self.url, header=self._headers, timeout=CONNECT_TIMEOUT_S,
                                                 enable_multithread=True, skip_utf8_validation=True)
            except Exception as exc:  # refused, DNS, TLS, HTTP 401...: report the kind, retry
                reason = _describe(exc)
                self._put(SocketEvent("closed", reason=f"connect failed: {reason}", attempt=attempt))
                delay = backoff * random.uniform(0.8, 1.2)
                # the first refusals are the usual start-up race with a local server: say so quietly
                level = logging.INFO if attempt <= QUIET_ATTEMPTS and self.connects == 0 else logging.WARNING
                log.log(level, kv("connect_failed", attempt=attempt, reason=repr(reason), retry_in_s=round(delay, 2)))
                self._stop.wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            ws.settimeout(1.0)
            self._ws = ws
            self.connected = True
            self.connects += 1
            connected_at = time.monotonic()
            backoff = BACKOFF_START_S
            self._put(SocketEvent("connected", attempt=attempt))
            reason = self._read(ws, connected_at)
            if self._paused.is_set() or self._closed_for_pause.is_set():  # ours to close, however it ended
                self._close_current()
                reason = PAUSED_REASON
            self._closed_for_pause.clear()
            self.connected = False
            self._ws = None
            self._put(SocketEvent("closed", reason=reason, attempt=attempt))
            if not self._stop.is_set() and not self._renew.is_set() and not self._paused.is_set():
                delay = backoff * random.uniform(0.8, 1.2)
                self._stop.wait(delay)
            self._renew.clear()

    def _read(self, ws: websocket.WebSocket, connected_at: float) -> str:
        while not self._stop.is_set() and not self._paused.is_set():
            if time.monotonic() - connected_at > self.max_session_s:
                self._close_current()
                return "session time limit: renewing"
            try:
                text = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as exc:
                return _describe(exc)
            if text is None or text == "":
                if not ws.connected:
                    return "closed by server"
                continue
            self._put(SocketEvent("message", text=text if isinstance(text, str) else text.decode("utf-8", "replace"),
                                  t_recv_ns=time.time_ns()))
        return "stopping"

    def stop(self) -> None:
        self._stop.set()
        self._close_current()
        if self._thread.ident is not None:  # a stage stopped before it started has no thread to wait for
            self._thread.join(timeout=2.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return f"HTTP {exc.status_code}"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
