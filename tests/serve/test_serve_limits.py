"""What a client may not do: send bodies over the limit or too slowly, nest JSON without end, stall the event
loop with a huge prompt, hold a connection by sending its headers byte by byte. And the warning when the
server listens on the network without an API key."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from click.testing import CliRunner
from serving_setup import make_base

from adapterhub.cli import main
from adapterhub.serve import server as server_module
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.server import exposure_warning, serve_in_thread

LIMITS = HttpLimits(max_body_bytes=1 << 20, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=30)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(make_base(), None, EngineConfig(max_batch=4))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine):
    with serve_in_thread(create_app(engine, api_key="", limits=LIMITS), limits=LIMITS) as url:
        yield url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_response(sock: socket.socket, timeout_s: float = 10) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response; status 0 when the server closed without answering."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next((int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def is_closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (after any response) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# --- body size ---------------------------------------------------------------------------------------------


def test_a_declared_100_mb_body_gets_413_before_it_is_sent(url):
    with connect(url) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000000\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 413 and time.monotonic() - started < 2
        error = json.loads(body)["error"]
        assert error["code"] == "PayloadTooLargeError" and "100000000 bytes" in error["message"]
        assert "--max-body-bytes" in error["message"] and str(LIMITS.max_body_bytes) in error["message"]
        assert is_closed_within(sock, LIMITS.header_timeout_s + 1.5)  # the body it still owes never came


def test_a_chunked_100_mb_body_is_cut_at_the_limit_without_buffering_it(url):
    before = rss_mib()
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, status = 0, None
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        try:
            while sent < 100_000_000:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                sock.sendall(frame)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = read_response(sock)[0]
    assert sent < 40_000_000, f"the server read {sent} bytes of a body over its 1 MiB limit"
    assert status in (413, 0)  # 0: the reset overtook the 413 on the client's side
    assert rss_mib() - before < 64
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("times_the_limit", [1.01, 3, 8])
def test_an_oversized_body_gets_its_413_through_httpx_not_a_reset(url, times_the_limit):
    # httpx sends the whole body before it reads: the server drains it (up to 16x the limit) after answering.
    with httpx.Client(base_url=url) as client:
        prompt = "x" * int(LIMITS.max_body_bytes * times_the_limit)
        for _ in range(5):
            response = client.post("/v1/completions", json={"prompt": prompt})
            assert response.status_code == 413 and response.json()["error"]["code"] == "PayloadTooLargeError"
        assert client.get("/health").status_code == 200  # on the same connection: the body was drained


# --- body time, header time ----------------------------------------------------------------------------------


def test_a_body_sent_byte_by_byte_gets_408_within_the_body_timeout(url):
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{")
        started = time.monotonic()
        status = None
        while time.monotonic() - started < 5:
            if select.select([sock], [], [], 0.2)[0]:
                status, headers, body = read_response(sock)
                break
            sock.sendall(b" ")
        assert status == 408, status
        assert time.monotonic() - started < LIMITS.body_timeout_s + 1.5
        assert json.loads(body)["error"]["code"] == "RequestTimeoutError" and headers["connection"] == "close"
        assert is_closed_within(sock, 2)


def test_headers_sent_byte_by_byte_are_cut_at_the_header_timeout(url):
    with connect(url) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        closed_or_answered = False
        while time.monotonic() - started < 6:
            if select.select([sock], [], [], 0.2)[0]:
                status, _, body = read_response(sock, timeout_s=2)
                assert status in (408, 0)
                closed_or_answered = True
                break
            try:
                sock.sendall(b"x-slow: a\r\n")  # never the blank line that ends the headers
            except (BrokenPipeError, ConnectionResetError):
                closed_or_answered = True
                break
        assert closed_or_answered, "a slowloris client held the connection"
        assert time.monotonic() - started < LIMITS.header_timeout_s + 1.5


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(url):
    with connect(url) as sock:
        assert is_closed_within(sock, LIMITS.header_timeout_s + 1.5)


def test_an_unread_body_that_never_ends_does_not_keep_the_connection(url):
    # /health does not read bodies: after its answer the connection waits for the rest of this one, but
    # only until the deadline, however the bytes trickle.
    with connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nabc")
        assert read_response(sock)[0] == 200
        started, is_closed = time.monotonic(), False
        while not is_closed and time.monotonic() - started < 6:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            is_closed = is_closed_within(sock, 0.2)
        assert time.monotonic() - started < LIMITS.header_timeout_s + 1.5


def test_an_unread_body_that_arrives_keeps_the_connection_for_the_next_request(url):
    with connect(url) as sock:
        sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n")
        assert read_response(sock)[0] == 404
        sock.sendall(b"12345GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # the body's end, then a new request
        assert read_response(sock)[0] == 200


def test_idle_keep_alive_connections_outlive_the_header_timeout(url):
    with httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200
        time.sleep(LIMITS.header_timeout_s + 0.5)
        assert client.get("/health").status_code == 200


# --- JSON and prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"],
                         ids=["array", "prompt"])
def test_json_nested_200k_deep_is_a_400(url, body):
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]


def test_a_deep_but_parseable_value_is_shown_briefly_in_the_400(url):
    prompt = json.loads("[" * 500 + "]" * 500)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt})
    assert response.status_code == 400 and "'prompt'" in response.json()["error"]["message"]
    assert len(response.json()["error"]["message"]) < 400


def poll_health(url: str, until: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while not until.is_set():
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    return latencies


def test_health_answers_while_a_slow_prompt_is_tokenized(url, engine, monkeypatch):
    tokenizer = engine.base.tokenizer
    real_encode = tokenizer.encode

    def slow_encode(text, *args, **kwargs):  # a big prompt on a big tokenizer: seconds of CPU
        time.sleep(2.0)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    done = threading.Event()
    result = {}

    def post():
        result["response"] = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        done.set()

    poster = threading.Thread(target=post)
    poster.start()
    latencies = poll_health(url, done)
    poster.join()
    assert result["response"].status_code == 200
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def test_a_10m_character_prompt_is_refused_without_tokenizing_and_health_stays_fast(engine, monkeypatch):
    tokenizer = engine.base.tokenizer
    calls = []
    monkeypatch.setattr(tokenizer, "encode", lambda *args, **kwargs: calls.append(1) or [1])
    limits = HttpLimits(max_body_bytes=32 << 20)
    with serve_in_thread(create_app(engine, api_key="", limits=limits), limits=limits) as url:
        done, result = threading.Event(), {}

        def post():
            started = time.monotonic()
            result["response"] = httpx.post(f"{url}/v1/completions", json={"prompt": "é" * 10_000_000}, timeout=60)
            result["seconds"] = time.monotonic() - started
            done.set()

        poster = threading.Thread(target=post)
        poster.start()
        latencies = poll_health(url, done)
        poster.join()
    response = result["response"]
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "'prompt' has 10000000 characters" in message and "at most" in message
    assert calls == [] and result["seconds"] < 10
    assert max(latencies, default=0) < 1.0, latencies


# --- listening on the network without a key -----------------------------------------------------------------


def test_exposure_warning_only_for_a_network_host_without_a_key():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    assert exposure_warning("0.0.0.0", "s3cret") is None
    for host in ("0.0.0.0", "::", "192.168.1.4", "myhost.example"):
        warning = exposure_warning(host, None)
        assert "\n" not in warning and host in warning
        assert "anyone" in warning and "network" in warning and "ADAPTERHUB_API_KEY" in warning


def test_serve_warns_on_stderr_and_passes_the_limits(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(server_module, "run_server", lambda app, host, port, limits, sock: calls.append((host, limits)))
    monkeypatch.setattr(server_module, "bind_socket", lambda host, port: socket.socket())  # no real port taken
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path))
    monkeypatch.delenv("ADAPTERHUB_API_KEY", raising=False)
    args = ["serve", "--host", "0.0.0.0", "--max-body-bytes", "12345", "--header-timeout", "3",
            "--body-timeout", "4", "--max-connections", "7"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "WARNING: serving on 0.0.0.0 with no API key" in result.stderr
    assert "ADAPTERHUB_API_KEY" in result.stderr and "WARNING" not in result.stdout
    assert calls == [("0.0.0.0", HttpLimits(max_body_bytes=12345, header_timeout_s=3, body_timeout_s=4,
                                            max_connections=7))]
    monkeypatch.setenv("ADAPTERHUB_API_KEY", "s3cret")
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "WARNING" not in result.stderr


def test_uvicorn_config_carries_the_limits():
    config = server_module.uvicorn_config(object(), limits=LIMITS)
    assert config.limit_concurrency == LIMITS.max_connections and config.timeout_keep_alive == 30
    assert config.h11_max_incomplete_event_size == LIMITS.max_header_bytes
    assert issubclass(config.http, server_module.HeaderDeadlineProtocol)
    assert config.http.header_timeout_s == LIMITS.header_timeout_s
