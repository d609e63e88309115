"""The ASGI middleware that bounds a request body in bytes and in time (`limits.HttpLimits`).

The size is checked on the declared Content-Length before anything is read, then on the bytes actually
received, so a chunked 100 MB upload is cut at the limit instead of being buffered.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse

from adapterhub.errors import AdapterHubError, PayloadTooLargeError, RequestTimeoutError
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.openai import error_json


class BodyLimit:
    """ASGI middleware: a body over `max_body_bytes` gets 413, one slower than `body_timeout_s` gets 408.

    A declared Content-Length over the limit is answered before a byte of the body is read. Otherwise
    `receive` is wrapped: it raises `PayloadTooLargeError` / `RequestTimeoutError` inside the handler's
    `request.body()`, which the API turns into its usual JSON error.
    """

    def __init__(self, app, limits: HttpLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limits.max_body_bytes:
            error = PayloadTooLargeError(_too_large(f"Content-Length is {declared} bytes", self.limits))
            return await _reject(error, scope, receive, send)
        await self.app(scope, _BoundedReceive(receive, self.limits), send)


class _BoundedReceive:
    """`receive` with the body counted and timed; once the body is complete it passes messages through
    (a streaming response keeps calling it to notice a disconnect)."""

    def __init__(self, receive, limits: HttpLimits):
        self._receive = receive
        self._limits = limits
        self._received = 0
        self._deadline: float | None = None
        self._is_complete = False

    async def __call__(self):
        if self._is_complete:
            return await self._receive()
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self._limits.body_timeout_s
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - loop.time()))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {self._limits.body_timeout_s:g} s "
                f"({self._received} bytes came); send it at once, or raise serve --body-timeout"
            ) from None
        self._count(message)
        return message

    def _count(self, message) -> None:
        if message["type"] != "http.request":
            self._is_complete = True  # http.disconnect
            return
        self._received += len(message.get("body", b""))
        if self._received > self._limits.max_body_bytes:
            what = f"{self._received} bytes arrived before it was cut off"
            raise PayloadTooLargeError(_too_large(what, self._limits))
        self._is_complete = not message.get("more_body", False)


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # h11 has already refused a malformed one
    return None


def _too_large(what: str, limits: HttpLimits) -> str:
    return (f"the request body is too large: {what}, the limit is {limits.max_body_bytes} bytes; "
            "shorten the prompt, or raise serve --max-body-bytes")


async def _reject(error: AdapterHubError, scope, receive, send) -> None:
    # The body is not read here; the server drains what the client still sends, within bounds
    # (`server.HeaderDeadlineProtocol`), so that the client reads this answer.
    response = JSONResponse(error_json(error, error.http_status), status_code=error.http_status)
    await response(scope, receive, send)
