"""Limits at the HTTP edge: how large a request body may be, how long its headers and its body may
take to arrive (slowloris: a client that opens connections and never finishes a request must not
hold them), how many engine requests one HTTP request keeps queued at once."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the CLI reads the defaults without loading the web stack
    from fastapi import Request


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20      # a 128k-token prompt as JSON ids is ~1 MB
    header_timeout: float = 10.0       # seconds for a request's headers, from connect or the last response
    body_timeout: float = 30.0         # seconds for the whole body, from the end of the headers
    max_queued_per_request: int = 64   # engine requests (prompts x n) one HTTP request has queued at once


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused (413) past max_body_bytes and (408) when it has not all arrived
    within body_timeout; either way the connection is closed, so the rest is never read."""
    from qwen2.serve.errors import APIError
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                           code="request_timeout", close=True) from None
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(limits)
        chunks.append(chunk)


def _too_large(limits: Limits):
    from qwen2.serve.errors import APIError
    return APIError(413, f"request body larger than {limits.max_body_bytes} bytes (--max-body-size)",
                    code="request_too_large", close=True)


def h11_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    header_timeout seconds of its opening or of its previous response. (uvicorn arms no timer
    before the first request, and cancels its keep-alive timer on the first byte of the next, so
    a client sending nothing, or headers at a byte a second, holds the connection forever.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:   # the request line and headers are in
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
