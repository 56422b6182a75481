"""The HTTP layer under the app: a deadline on receiving each request, the uvicorn settings the
server runs with, the security headers every response carries and the Host check.

    config = server_config(app, "127.0.0.1", 8000, request_read_timeout=10)
    uvicorn.Server(config).run()

uvicorn's `timeout_keep_alive` only covers the idle time between two requests, and every byte
received resets it; nothing bounds the time a client takes to send one request, so a client that
sends a byte every few seconds holds its connection forever (the probe kept 300 such connections
open). ASGI middleware cannot help: the app is only called once the headers are whole. So the
protocol itself gets a deadline: from a connection's first byte of a request (or its opening) to
the end of that request's body. Responses are not bounded by it: a long streamed answer is fine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("chatforge.serve")

# The chat page loads its own script and style sheet only and talks to its own origin: nothing
# inline, nothing from elsewhere, never inside another site's frame.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: bytes | None) -> str | None:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1"), lower case."""
    if not header:
        return None
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a deadline of `seconds` on receiving each request
    (headers and body); a connection past it is closed."""
    class RequestDeadline(AutoHTTPProtocol):   # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                log.info("closing a connection that took over %ss to send its request", seconds)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()                     # the next request on a kept-alive connection
            super().data_received(data)
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                self._disarm()                  # the whole request is in

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return RequestDeadline


def server_config(app: Any, host: str, port: int, request_read_timeout: float = 10.0,
                  keep_alive: int = 5, max_connections: int | None = 1000, **kw: Any):
    """The uvicorn config `chatforge serve` runs with: each request must arrive whole within
    `request_read_timeout` seconds, an idle kept-alive connection closes after `keep_alive`
    seconds, and beyond `max_connections` open connections new requests get 503."""
    return uvicorn.Config(app, host=host, port=port, http=deadline_protocol(request_read_timeout),
                          timeout_keep_alive=keep_alive, limit_concurrency=max_connections, **kw)
