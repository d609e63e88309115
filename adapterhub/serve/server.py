"""Running the HTTP app with uvicorn: the connection limits, and a server in a background thread (tests,
benchmarks, notebooks).

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`), the number of connections
(`limit_concurrency`, then 503) and the size of a request's headers (`h11_max_incomplete_event_size`), but
not the time a client takes to send them: its keep-alive timer is cancelled by any byte, so a client that
sends its headers one byte every few seconds holds a connection forever (slowloris). `HeaderDeadlineProtocol`
adds that deadline to uvicorn's h11 protocol; the body's own bounds are `bodylimit.BodyLimit`'s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
import time
from typing import Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapterhub.errors import ConfigError
from adapterhub.serve.limits import HttpLimits

_TIMEOUT_BODY = json.dumps({"error": {"message": "the request headers did not arrive in time; send them at once",
                                      "type": "invalid_request_error", "code": "RequestTimeoutError"}}).encode()
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus one deadline, `header_timeout_s`, on whatever the client owes: the headers
    of a new connection's first request, the rest of the headers of a request it has begun, or the rest of a
    body the answer did not wait for (a 413, 404 or 401 sent before reading it). Bytes trickling in do not
    extend it; when it passes the connection is closed (with a 408 when headers were due).

    An unread body is drained (read and dropped, as uvicorn does once the response is out), at most
    `max_drain_bytes` of it: a client still sending its too-large body then reads its 413 instead of a
    connection reset (nginx's lingering close). An idle keep-alive connection owes nothing: uvicorn's
    `timeout_keep_alive` closes it."""

    header_timeout_s: float = HttpLimits.header_timeout_s  # both set per server by `uvicorn_config`
    max_drain_bytes: int = 16 * HttpLimits.max_body_bytes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = None
        self._is_fresh = True  # no request's headers yet on this connection
        self._drained = 0  # bytes of unread bodies read and dropped

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._sync_deadline()

    def data_received(self, data: bytes) -> None:
        self._drained += len(data) if self._is_draining() else 0
        if self._drained > self.max_drain_bytes:
            self.transport.close()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._is_fresh = False
        self._sync_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._drained = 0
        self._sync_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _is_draining(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE

    def _is_owing(self) -> bool:
        if self.conn.their_state is h11.IDLE:  # trailing_data: bytes received, not parsed yet: a begun request
            return self._is_fresh or bool(self.conn.trailing_data[0])
        return self._is_draining()

    def _sync_deadline(self) -> None:
        if not self._is_owing():
            self._cancel_deadline()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if not self._is_owing() or self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits = HttpLimits(),
                   **options) -> uvicorn.Config:
    """The uvicorn settings of `adapterhub serve`: the h11 protocol with the header deadline, and the limits."""
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                    {"header_timeout_s": limits.header_timeout_s, "max_drain_bytes": 16 * limits.max_body_bytes})
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning",
                          timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **options)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, opened before the model loads so that a busy port fails at once
    (one line, ConfigError) instead of after minutes of loading; uvicorn then serves on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host!r} does not resolve ({error.strerror}); use an address such as 127.0.0.1")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; a listening one not
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror} (errno {error.errno}); stop what uses "
                          "that port or pick another with --port") from None
    sock.set_inheritable(True)
    return sock


def run_server(app, host: str, port: int, limits: HttpLimits = HttpLimits(), sock: socket.socket | None = None) -> None:
    """Serves until interrupted (Ctrl-C); on `sock` when given (`bind_socket`)."""
    server = uvicorn.Server(uvicorn_config(app, host, port, limits))
    server.run(sockets=[sock] if sock is not None else None)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """One line for stderr when the server listens beyond this machine without an API key; else None."""
    if api_key or _is_loopback(host):
        return None
    return (f"WARNING: serving on {host} with no API key: anyone who can reach this machine on the network can "
            f"generate, and load or unload adapters. Set ADAPTERHUB_API_KEY=<secret> (clients then send "
            f"'Authorization: Bearer <secret>'), or serve on --host 127.0.0.1.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
                    limits: HttpLimits = HttpLimits(keep_alive_s=30)) -> Iterator[str]:
    """Serves ``app`` until the block exits; yields its base URL. Port 0 picks a free port.
    (Keep-alive 30 s by default: test clients pause between requests longer than uvicorn's 5 s.)"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, host, port, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="adapterhub-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
