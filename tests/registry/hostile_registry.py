"""A hostile OCI registry for tests: a real HTTP proxy in front of Debian's docker-registry that misbehaves
on cue, and the helper that starts docker-registry itself on 127.0.0.1.

`HostileRegistry(upstream)` forwards every request to the real registry unless one of its rules answers
first: a rule is a function ``Exchange -> Reply | None`` (add it with `on`). A rule can swap a manifest,
corrupt or stretch a blob, point a ``Link`` / ``Location`` at another origin, or never answer.
`HostileRegistry(None)` forwards nothing (404 unless a rule answers): a second origin that records the
``Authorization`` header of every request it gets, to show that credentials never reach it.

Bodies may be iterables of bytes, produced as they are sent (chunked, or raw after a declared
``Content-Length``), so a 600 MB answer costs the test no memory; `sent_bytes` says how much of it left
before the client hung up.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator

import httpx
import pytest

BINARY = shutil.which("docker-registry")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def docker_registry(root, extra: str = ""):
    """Run docker-registry with filesystem storage under `root`; yields its oci:// URL (namespace "team")."""
    if BINARY is None:
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed but CI is set; .ci/run installs it")
        pytest.skip("docker-registry (Debian package) is not installed")
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
        f"{root / 'data'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}")
    process = subprocess.Popen([BINARY, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/").status_code in (200, 401):
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            pytest.fail("docker-registry did not answer /v2/ within 10 s")
        yield f"oci://127.0.0.1:{port}/team"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass(frozen=True)
class Exchange:
    """One request as the hostile server received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Reply:
    """An answer; an iterable `body` is sent as it is produced (chunked unless headers declare Content-Length)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""


Rule = Callable[[Exchange], "Reply | None"]


def endless(total: int, block: bytes = b" " * (1 << 20)) -> Iterator[bytes]:
    """`total` bytes of `block`s, made as they are sent (a 600 MB body without 600 MB of memory)."""
    for _ in range(total // len(block)):
        yield block


def trickle(data: bytes, pause: float) -> Iterator[bytes]:
    """`data` one byte at a time, `pause` seconds apart: a server that is alive but never finishes."""
    for i in range(len(data)):
        time.sleep(pause)
        yield data[i:i + 1]


class HostileRegistry:
    """A proxy to `upstream` ("oci://127.0.0.1:port/ns" or None) on its own port; see the module docstring."""

    def __init__(self, upstream: str | None, namespace: str = "team"):
        self.upstream = None if upstream is None else httpx.URL(upstream.replace("oci://", "http://", 1))
        self.namespace = namespace
        self.rules: list[Rule] = []
        self.seen: list[Exchange] = []
        self.sent_bytes = 0
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self
        self.port = self._server.server_address[1]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"oci://127.0.0.1:{self.port}/{self.namespace}"

    @property
    def authorizations(self) -> list[str | None]:
        return [e.headers.get("authorization") for e in self.seen]

    def on(self, method: str, path: str, rule: Rule) -> None:
        """Let `rule` answer requests whose method matches and whose path (without query) fully matches `path`."""
        pattern = re.compile(path)

        def guarded(exchange: Exchange) -> Reply | None:
            if re.fullmatch(method, exchange.method) and pattern.fullmatch(exchange.path.partition("?")[0]):
                return rule(exchange)
            return None

        self.rules.append(guarded)

    def hang(self, exchange: Exchange) -> Reply:
        """A rule that never answers (until the server stops)."""
        self.stopping.wait(120)
        return Reply(503)

    def answer(self, exchange: Exchange) -> Reply:
        self.seen.append(exchange)
        for rule in self.rules:
            reply = rule(exchange)
            if reply is not None:
                return reply
        return self.forward(exchange) if self.upstream is not None else Reply(404)

    def forward(self, exchange: Exchange) -> Reply:
        """The real registry's answer. The Host header goes along, so its Location URLs name this proxy."""
        connection = http.client.HTTPConnection(self.upstream.host, self.upstream.port, timeout=30)
        try:
            headers = {k: v for k, v in exchange.headers.items() if k not in HOP_BY_HOP}
            connection.request(exchange.method, exchange.path, body=exchange.body or None, headers=headers)
            response = connection.getresponse()
            body = response.read()
            out = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            if exchange.method == "HEAD":
                out["Content-Length"] = response.getheader("Content-Length") or "0"
            return Reply(response.status, out, body)
        finally:
            connection.close()

    def __enter__(self) -> HostileRegistry:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet: the tests assert on what matters
        return None

    def handle_one(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.owner.answer(Exchange(self.command, self.path, headers, body))
        try:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: that is what a limit does
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = handle_one

    def _send(self, reply: Reply) -> None:
        owner = self.server.owner
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        declared = any(k.lower() == "content-length" for k in reply.headers)
        if isinstance(reply.body, (bytes, bytearray)):
            if not declared:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
                owner.sent_bytes += len(reply.body)
            return
        if not declared:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in reply.body:
            self.wfile.write(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            owner.sent_bytes += len(chunk)
        if not declared:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True  # an endless or trickled body leaves the connection in no state to reuse
