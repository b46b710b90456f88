"""Slow clients (slowloris): uvicorn bounds the idle time between two requests on a kept-alive connection
(``timeout_keep_alive``) and the connections it serves at once (``limit_concurrency``, 503 past it), but not
the time a client takes to send a request: a connection that sent half a request line stayed open for ever.

:func:`guarded_h11` makes uvicorn's h11 protocol (the class its ``http`` setting takes) close a connection whose
request head has not fully arrived ``header_timeout_s`` after the connection opened or the previous response
ended (answering ``408 Request Timeout``), or whose body has not arrived ``body_timeout_s`` after its head (the
app then sees the client disconnect). The deadline is judged from h11's own parser state
(``Connection.their_state``): IDLE until the head is parsed, SEND_BODY while the body comes, DONE once the whole
request is in. Responses, however long (a followed log), are not bounded."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("cloudai.server.security")

_TIMEOUT_BODY = b"the request did not arrive in time; send it whole, then retry\n"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(_TIMEOUT_BODY)) + _TIMEOUT_BODY


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on a request's head and body (see the module docstring)."""

    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_for = ""  # "head", "body" or "" (the whole request is in: no deadline)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.expect("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.follow_parser()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already parse a pipelined request
        if not self.transport.is_closing():
            self.expect("head")
            self.follow_parser()

    def connection_lost(self, exc: Exception | None) -> None:
        self.expect("")
        super().connection_lost(exc)

    def follow_parser(self) -> None:
        """Move the deadline along with what the parser has seen of the current request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return  # still the head: its deadline runs on
        self.expect("body" if state is h11.SEND_BODY else "")

    def expect(self, part: str) -> None:
        """Start the deadline for ``part`` (``""``: none), unless it already runs."""
        if part == self.waiting_for and (part == "" or self.deadline is not None):
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.waiting_for = part
        if part:
            seconds = self.header_timeout_s if part == "head" else self.body_timeout_s
            self.deadline = self.loop.call_later(seconds, self.expired)

    def expired(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        seconds = self.header_timeout_s if self.waiting_for == "head" else self.body_timeout_s
        log.warning("closed the connection of %s: its request %s did not arrive within %g s", client,
                    self.waiting_for, seconds)
        if self.waiting_for == "head" and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMEOUT_RESPONSE)  # nothing was sent on this request yet
        self.waiting_for = ""
        self.transport.close()


def guarded_h11(header_timeout_s: float, body_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``http=``) with these deadlines."""
    return type("GuardedH11", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
