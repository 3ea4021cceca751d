"""uvicorn, with the timeouts a server on a network needs.

uvicorn closes an idle keep-alive connection, but a client that connects and sends nothing,
or its headers or body a byte at a time, holds a connection for ever. :class:`TimedH11Protocol`
gives each request ``header_timeout`` seconds from its first byte (or from the connection)
to finish its headers and ``body_timeout`` seconds to finish its body, then closes the
connection with one log line.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from xmodal.serve.security import exposure_warnings
from xmodal.serve.settings import ServeSettings

log = logging.getLogger("xmodal.serve")


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request's headers and body."""

    def __init__(self, *args: Any, header_timeout: float, body_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.read_timer: asyncio.TimerHandle | None = None
        self.reading: str | None = None  # "headers", "body" or None (waiting for the app)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Arm the timer for what the client still has to send."""
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.our_state is h11.IDLE:
            # between requests: uvicorn's keep-alive timer runs until a byte arrives
            self._expect("headers" if self.timeout_keep_alive_task is None else None)
        elif state is h11.SEND_BODY:
            self._expect("body")
        elif state is not h11.IDLE:
            self._expect(None)

    def _expect(self, what: str | None) -> None:
        if what == self.reading and (what is None or self.read_timer is not None):
            return
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        self.reading = what
        if what is not None:
            seconds = self.header_timeout if what == "headers" else self.body_timeout
            self.read_timer = self.loop.call_later(seconds, self._timed_out, what, seconds)

    def _timed_out(self, what: str, seconds: float) -> None:
        self.read_timer = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info(
            "closed the connection of %s: request %s not received in %g s", client, what, seconds
        )
        self.transport.close()


def build_server(app: Any, settings: ServeSettings) -> Any:
    """A ``uvicorn.Server`` for ``app`` with the settings' timeouts and connection limit; the
    service's own log lines (warnings, timeouts, clients gone) go where uvicorn's go."""
    import uvicorn

    protocol = partial(
        TimedH11Protocol,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=protocol,  # type: ignore[arg-type]
        timeout_keep_alive=int(max(1, round(settings.keepalive_timeout))),
        limit_concurrency=settings.max_connections,
        server_header=False,
    )
    server_log = logging.getLogger("uvicorn")  # uvicorn's handler sits on its root logger
    if server_log.handlers:
        log.handlers, log.propagate = list(server_log.handlers), False
        log.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())
    return uvicorn.Server(config)


def run(app: Any, settings: ServeSettings) -> None:
    """Serve ``app`` until stopped, after warning about an exposed server."""
    server = build_server(app, settings)
    for warning in exposure_warnings(settings):
        log.warning(warning)
    server.run()
