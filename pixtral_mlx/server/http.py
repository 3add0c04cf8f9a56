"""uvicorn, bounded and stopped as services are: `_HTTP` bounds open connections and the time for a request's
headers (so slow clients cannot take the server's file descriptors); `Server` stops on SIGTERM/SIGINT after a
grace period and returns normally."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from .engine import Engine
from .limits import HEADER_TIMEOUT, MAX_CONNECTIONS, SHUTDOWN_GRACE
from .schema import APIError

log = logging.getLogger("pixtral_mlx.server")


class _HTTP(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks, so slow clients cannot take the server's file
    descriptors: at most `max_connections` open connections (one more is answered 503 and closed at once), and
    `header_timeout` seconds for a request's headers, counted from the connection or from the first byte of a
    request that follows another (a client sending them a byte at a time is dropped). The body's time is
    `Settings.body_timeout`; an idle kept-alive connection closes after uvicorn's `timeout_keep_alive`."""

    max_connections = MAX_CONNECTIONS
    header_timeout = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None
    _warned = 0.0  # when a refused connection was last logged (once in 10 s at most)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) <= self.max_connections:
            self._wait_for_headers()
            return
        if time.monotonic() - _HTTP._warned > 10:
            _HTTP._warned = time.monotonic()
            log.warning("refusing connections: %d are open (--max-connections)", self.max_connections)
        transport.write(_BUSY)
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # bytes of a request's headers
            self._wait_for_headers()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are all in
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _wait_for_headers(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._header_timer = None
        self.transport.close()


def _busy_response() -> bytes:
    error = APIError(
        503, "the server has too many open connections; retry later.", type="server_error", code="too_many_connections"
    )
    body = json.dumps(error.body()).encode()
    head = f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return (head + "connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


_BUSY = _busy_response()


class Server(uvicorn.Server):
    """uvicorn's server on `_HTTP`, stopped as `docker stop` and systemd expect: on SIGTERM or SIGINT it stops
    accepting, lets running requests finish for `grace` seconds, ends the rest (a stream gets an error event
    and [DONE], a waiting request a 503) and returns; `signal` is the signal that stopped it. (uvicorn's own
    raises the signal again once stopped, which kills the process before its caller can close the engine.)
    A second signal stops it at once."""

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        grace: float = SHUTDOWN_GRACE,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        **config: Any,
    ):
        http = type("HTTP", (_HTTP,), {"max_connections": max_connections, "header_timeout": header_timeout})
        # uvicorn cancels what is left 2 s after the engine ended the requests
        super().__init__(uvicorn.Config(app, http=http, ws="none", timeout_graceful_shutdown=grace + 2, **config))
        self.engine, self.grace = engine, grace
        self.signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.signal is not None:
            self.force_exit = True
        self.signal = self.signal or sig
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        error = APIError(503, "the server is shutting down; this request was stopped.", type="server_error",
                         code="server_shutting_down")  # fmt: skip
        ending = asyncio.get_running_loop().call_later(self.grace, self.engine.cancel_all, error)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ending.cancel()
