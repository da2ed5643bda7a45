"""Connections that cannot starve the server: uvicorn's HTTP/1.1 protocol with a request timeout, and its options.

A client that opens a connection and never finishes its request (slow-loris) costs the server a socket and
nothing else here: uvicorn's own `limit_concurrency` would count such connections and answer everyone 503 once
enough are open, so it is off, and the bound is on what costs work instead:

    REQUEST_TIMEOUT_S        a connection whose request (headers and body) is not complete this long after it
                             opened, or after its previous response, is closed (`GuardedH11Protocol`)
    CONCURRENT_REQUESTS      requests being handled at once (after their headers arrived); beyond it 503 with
                             Retry-After (kedavra.serving.app.RequestGuard); the generation queue bounds the work
    KEEP_ALIVE_S             uvicorn's idle keep-alive between requests
    the open-file limit      raised to its hard limit at start (`raise_open_file_limit`), so idle sockets do not
                             exhaust the process's descriptors before the timeout reaps them

A per-client connection cap is not applied: clients behind one address (a proxy, loopback) would share it, and
the attacker's connections would lock the legitimate client out.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT_S = 30.0  # a 20 MB body at under 1 MB/s still fits; a request that never ends does not
CONCURRENT_REQUESTS = 256  # requests in the app at once: far above the queue, so waiting clients and polls fit
KEEP_ALIVE_S = 5  # uvicorn's default idle keep-alive
GRACEFUL_SHUTDOWN_S = 10  # on Ctrl-C, requests still waiting after this long are cancelled


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request is not complete within REQUEST_TIMEOUT_S."""

    request_timeout = REQUEST_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._arm_request_timer()

    def _arm_request_timer(self) -> None:
        self._cancel_request_timer()
        self._request_timer = self.loop.call_later(self.request_timeout, self._request_overdue)

    def _cancel_request_timer(self) -> None:
        if getattr(self, "_request_timer", None) is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_overdue(self) -> None:
        self._request_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._cancel_request_timer()  # the request is in: the app's own limits take over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_request_timer()  # the next request on this connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)


def uvicorn_options() -> dict:
    """The uvicorn Config options kedavra serve runs with (and the tests serve with)."""
    return {"http": GuardedH11Protocol, "limit_concurrency": None, "timeout_keep_alive": KEEP_ALIVE_S,
            "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S}


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (where the platform has one); the limit."""
    try:
        import resource
    except ImportError:  # Windows
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft
