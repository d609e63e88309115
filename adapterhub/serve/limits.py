"""How much and how slowly an HTTP client may send: the numbers, set by `adapterhub serve`'s options.

A client must not be able to hold the server's memory or its connections. The body's bounds are enforced
by `bodylimit.BodyLimit` (an ASGI middleware of the app), the connection's by uvicorn and
`server.HeaderDeadlineProtocol` (`server.uvicorn_config`). No imports: the CLI reads the defaults at startup.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpLimits:
    # A request is a prompt of at most the context (a few hundred KB of text for 128k tokens) plus parameters.
    max_body_bytes: int = 4 * 2**20
    header_timeout_s: float = 10.0  # a request's headers, from its first byte (or the connection's opening); also
    # the rest of a body the answer did not wait for (server.HeaderDeadlineProtocol)
    body_timeout_s: float = 30.0  # from the handler's first read to the body's last byte
    keep_alive_s: int = 5  # an idle connection between requests (uvicorn's default)
    max_connections: int = 512  # beyond this uvicorn answers 503 at once
    max_header_bytes: int = 16 * 1024  # h11's default bound on the request line plus headers
