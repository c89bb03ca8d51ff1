"""What one client may hold open on our HTTP servers (`serve`'s front door, a `web` stage's page).

aiohttp reads headers for as long as a client takes, one byte a minute if it likes (slowloris), and takes
as many connections from one address as it opens. Its keepalive timer runs from the moment a connection is
made and closes one still waiting for a whole request when it fires: set short, it is a header-read
timeout. The per-address cap is counted from the server's own list of connections, so nothing here can
drift from what is really open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from common.log import RateLimitedLog, kv

# a request's headers (and an idle keep-alive connection) get this long; a browser sends them in one packet
HEADER_TIMEOUT_S = 10.0
# a browser opens ~6 per host; a caller holds 2 (offer, then /call polling); headroom for NAT'd offices
MAX_CONNECTIONS_PER_CLIENT = 32

log = logging.getLogger("voicebus.http")


def guarded_runner(app: web.Application, *, max_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                   header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs: Any) -> web.AppRunner:
    """An AppRunner whose connections time out waiting for headers and are capped per client address."""
    return _GuardedRunner(app, max_per_client, keepalive_timeout=header_timeout_s, access_log=None, **kwargs)


class _GuardedRunner(web.AppRunner):
    def __init__(self, app: web.Application, max_per_client: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.max_per_client = max_per_client
        self.refused = 0  # connections closed on arrival: their address already held max_per_client
        self._warn = RateLimitedLog(log)

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None
        admit = server.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            admit(handler, transport)
            address = _address(transport)
            if address is None:
                return
            held = sum(1 for other in server.connections if _address(other.transport) == address)
            if held > self.max_per_client:
                self.refused += 1
                self._warn.warning("connection_refused", kv("connection_refused", client=address, held=held - 1,
                                                            limit=self.max_per_client, refused=self.refused))
                transport.close()

        server.connection_made = connection_made  # type: ignore[method-assign]


def _address(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if isinstance(peer, tuple) and peer else None
