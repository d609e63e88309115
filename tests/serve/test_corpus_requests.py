"""A corpus of bad HTTP requests: each gets a 4xx JSON error whose message names what is wrong (the field, the
header, the body or the route), never a 5xx, and the server keeps serving (a good request right after succeeds)."""

from __future__ import annotations

import json

import httpx
import pytest
from serving_setup import make_base

from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.openai import prompt_char_limit
from adapterhub.serve.server import serve_in_thread

KEY = "corpus-key"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITS = HttpLimits(max_body_bytes=256 * 1024, keep_alive_s=30)
GOOD = {"prompt": "hi", "max_tokens": 1}
NAN, INF = "NaN", "Infinity"  # JSON extensions Python's json accepts; sent raw below


def completion(**fields) -> dict:
    return {"json": {"prompt": "hi", "max_tokens": 2, **fields}}


def raw(text: str | bytes, content_type: str = "application/json") -> dict:
    return {"content": text.encode() if isinstance(text, str) else text, "headers": {"content-type": content_type}}


def chat(**fields) -> dict:
    return {"path": "/v1/chat/completions", "json": {"messages": [{"role": "user", "content": "hi"}], **fields}}


# (id, request, status, words the error message must contain). A request is httpx.request keyword arguments
# plus "method" (default POST) and "path" (default /v1/completions).
CASES = [
    # prompt
    ("prompt-missing", {"json": {"max_tokens": 2}}, 400, "'prompt'"),
    ("prompt-int", completion(prompt=5), 400, "'prompt'"),
    ("prompt-null", completion(prompt=None), 400, "'prompt'"),
    ("prompt-empty-list", completion(prompt=[]), 400, "'prompt'"),
    ("prompt-two-prompts", completion(prompt=["a", "b"]), 400, "'prompt'"),
    ("prompt-nested-int-lists", completion(prompt=[[1, 2], [3]]), 400, "'prompt'"),
    ("prompt-nested-strings", completion(prompt=[["a"]]), 400, "'prompt'"),
    ("prompt-mixed-list", completion(prompt=[1, "a"]), 400, "'prompt'"),
    ("prompt-bool-ids", completion(prompt=[True, False]), 400, "'prompt'"),
    ("prompt-float-ids", completion(prompt=[1.5]), 400, "'prompt'"),
    ("prompt-object", completion(prompt={"text": "hi"}), 400, "'prompt'"),
    ("prompt-nested-100-deep", completion(prompt=json.loads("[" * 100 + "1" + "]" * 100)), 400, "'prompt'"),
    ("prompt-negative-id", completion(prompt=[-1]), 400, "prompt token ids"),
    ("prompt-id-over-vocab", completion(prompt=[10**12]), 400, "prompt token ids"),
    ("prompt-too-many-ids", completion(prompt=[1] * 5000), 400, "prompt has 5000 tokens"),
    # max_tokens
    ("max_tokens-string", completion(max_tokens="ten"), 400, "'max_tokens'"),
    ("max_tokens-zero", completion(max_tokens=0), 400, "'max_tokens'"),
    ("max_tokens-negative", completion(max_tokens=-5), 400, "'max_tokens'"),
    ("max_tokens-float", completion(max_tokens=1.5), 400, "'max_tokens'"),
    ("max_tokens-bool", completion(max_tokens=True), 400, "'max_tokens'"),
    ("max_tokens-huge", completion(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens-over-context", completion(max_tokens=2048), 400, "exceeds the context"),
    ("max_completion_tokens-zero", {"json": {"prompt": "hi", "max_completion_tokens": 0}}, 400,
     "'max_completion_tokens'"),
    # temperature, top_p, top_k, seed
    ("temperature-string", completion(temperature="hot"), 400, "'temperature'"),
    ("temperature-negative", completion(temperature=-0.5), 400, "'temperature'"),
    ("temperature-over-2", completion(temperature=2.5), 400, "'temperature' must be a number in [0, 2]"),
    ("temperature-nan", raw('{"prompt": "hi", "temperature": NaN}'), 400, "'temperature'"),
    ("temperature-infinity", raw('{"prompt": "hi", "temperature": Infinity}'), 400, "'temperature'"),
    ("temperature-1e400", raw('{"prompt": "hi", "temperature": 1e400}'), 400, "'temperature'"),
    ("top_p-zero", completion(top_p=0), 400, "'top_p' must be a number in (0, 1]"),
    ("top_p-over-1", completion(top_p=1.5), 400, "'top_p'"),
    ("top_p-nan", raw('{"prompt": "hi", "top_p": NaN}'), 400, "'top_p'"),
    ("top_p-list", completion(top_p=[0.5]), 400, "'top_p'"),
    ("top_k-negative", completion(top_k=-1), 400, "'top_k'"),
    ("top_k-2**63", completion(top_k=2**63), 400, "'top_k' must be an integer in [0, 2147483647]"),
    ("top_k-10**40", completion(top_k=10**40), 400, "'top_k'"),
    ("top_k-float", completion(top_k=1.5), 400, "'top_k'"),
    ("top_k-minus-infinity", raw('{"prompt": "hi", "top_k": -Infinity}'), 400, "'top_k'"),
    ("seed-string", completion(seed="abc"), 400, "'seed'"),
    ("seed-2**64", completion(seed=2**64), 400, "'seed' must be an integer in [-9223372036854775808"),
    ("seed-float", completion(seed=1.5), 400, "'seed'"),
    # n, stop, stream, model, unsupported fields
    ("n-17", completion(n=17), 400, "'n'"),
    ("n-0", completion(n=0), 400, "'n'"),
    ("n-string", completion(n="1"), 400, "'n'"),
    ("stop-int", completion(stop=5), 400, "'stop'"),
    ("stop-five-strings", completion(stop=["a", "b", "c", "d", "e"]), 400, "'stop'"),
    ("stop-too-long", completion(stop=["x" * 300]), 400, "'stop'"),
    ("stop-list-of-ints", completion(stop=[1]), 400, "'stop'"),
    ("stream-string", completion(stream="yes"), 400, "'stream'"),
    ("stream_options-string", completion(stream=True, stream_options="usage"), 400, "'stream_options'"),
    ("stream_options-include_usage-string", completion(stream=True, stream_options={"include_usage": "y"}), 400,
     "include_usage"),
    ("model-int", completion(model=5), 400, "'model'"),
    ("model-too-long", completion(model="m" * 1000), 400, "'model'"),
    ("model-path", completion(model="../../etc/passwd"), 400, "'model'"),
    ("model-unknown-adapter", completion(model="no-such-task"), 404, "'model'"),
    ("model-unknown-version", completion(model="summarize@v99"), 404, "'model'"),
    ("logprobs-21", completion(logprobs=21), 400, "'logprobs'"),
    ("logprobs-bool", completion(logprobs=True), 400, "'logprobs'"),
    ("presence_penalty-2.5", completion(presence_penalty=2.5), 400, "'presence_penalty'"),
    ("field-unknown", completion(temprature=0.5), 400, "'temprature'"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "'tools'"),
    ("response_format-json", chat(response_format={"type": "json_object"}), 400, "'response_format'"),
    ("best_of", completion(best_of=3), 400, "'best_of'"),
    ("echo", completion(echo=True), 400, "'echo'"),
    # chat messages
    ("messages-missing", {"path": "/v1/chat/completions", "json": {"max_tokens": 2}}, 400, "'messages'"),
    ("messages-empty", chat(messages=[]), 400, "'messages'"),
    ("messages-string", chat(messages="hi"), 400, "'messages'"),
    ("messages-item-string", chat(messages=["hi"]), 400, "'messages[0]'"),
    ("messages-no-role", chat(messages=[{"content": "hi"}]), 400, "'messages[0]'"),
    ("messages-role-int", chat(messages=[{"role": 1, "content": "hi"}]), 400, "'messages[0]'"),
    ("messages-content-int", chat(messages=[{"role": "user", "content": 5}]), 400, "'messages[0].content'"),
    ("messages-content-missing", chat(messages=[{"role": "user"}]), 400, "'messages[0].content'"),
    ("messages-content-image-part", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "'messages[0].content'"),
    ("messages-second-bad", chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": None}]),
     400, "'messages[1].content'"),
    ("chat-temperature-negative", chat(temperature=-1), 400, "'temperature'"),
    ("chat-top_k-huge", chat(top_k=2**63), 400, "'top_k'"),
    # the body itself
    ("body-invalid-json", raw('{"prompt": "hi",'), 400, "request body is not valid JSON"),
    ("body-empty", raw(b""), 400, "request body is not valid JSON"),
    ("body-not-utf8", raw(b'{"prompt": "\xff\xfe"}'), 400, "request body is not valid JSON"),
    ("body-int-5000-digits", raw('{"prompt": "hi", "seed": ' + "1" * 5000 + "}"), 400, "request body is not valid"),
    ("body-array", raw("[1, 2]"), 400, "request body must be a JSON object"),
    ("body-string", raw('"hi"'), 400, "request body must be a JSON object"),
    ("body-null", raw("null"), 400, "request body must be a JSON object"),
    ("body-nested-100k", raw("[" * 100_000), 400, "nested too deeply"),
    ("body-object-nested-40k", raw('{"prompt": ' + '{"a":' * 40_000), 400, "nested too deeply"),
    ("content-type-text", raw(json.dumps(GOOD), "text/plain"), 400, "Content-Type"),
    ("content-type-multipart", raw(json.dumps(GOOD), "multipart/form-data; boundary=x"), 400, "Content-Type"),
    ("body-over-limit", completion(prompt="x" * 300_000), 413, "--max-body-bytes"),
    ("adapters-ref-int", {"path": "/v1/adapters", "json": {"ref": 5}}, 400, '"ref"'),
    ("adapters-ref-missing", {"path": "/v1/adapters", "json": {}}, 400, '"ref"'),
    ("adapters-ref-unknown", {"path": "/v1/adapters", "json": {"ref": "no-such-task"}}, 404, "no-such-task"),
    ("adapters-delete-unknown", {"method": "DELETE", "path": "/v1/adapters/no-such-task"}, 404, "no-such-task"),
    # authorization, routes, methods
    ("auth-missing", {"json": GOOD, "headers": {"authorization": ""}}, 401, "Authorization"),
    ("auth-wrong-key", {"json": GOOD, "headers": {"authorization": "Bearer nope"}}, 401, "Authorization"),
    ("auth-no-bearer", {"json": GOOD, "headers": {"authorization": KEY}}, 401, "Authorization"),
    ("auth-basic", {"json": GOOD, "headers": {"authorization": "Basic Y29ycHVzOmtleQ=="}}, 401, "Authorization"),
    ("route-unknown", {"method": "GET", "path": "/v1/nothing"}, 404, "/v1/nothing"),
    ("route-engines", {"path": "/v1/engines/x/completions", "json": GOOD}, 404, "/v1/engines/x/completions"),
    ("method-get-completions", {"method": "GET", "path": "/v1/completions"}, 405, "GET /v1/completions"),
    ("method-delete-models", {"method": "DELETE", "path": "/v1/models"}, 405, "DELETE /v1/models"),
    ("method-put-health", {"method": "PUT", "path": "/health"}, 405, "PUT /health"),
]


@pytest.fixture(scope="module")
def corpus_server(registry):
    engine = Engine(make_base(), registry, EngineConfig(max_batch=4))
    try:
        with serve_in_thread(create_app(engine, api_key=KEY, limits=LIMITS), limits=LIMITS) as url, \
                httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
            yield engine, client
    finally:
        engine.close()


def test_the_corpus_is_large_and_every_case_is_distinct():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, request_spec, status, words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_4xx_json_error_naming_the_problem(corpus_server, case_id, request_spec, status, words):
    engine, client = corpus_server
    spec = dict(request_spec)
    response = client.request(spec.pop("method", "POST"), spec.pop("path", "/v1/completions"), **spec)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["type"] != "server_error"
    assert words in error["message"], error["message"]
    assert len(error["message"]) < 600  # a client's huge value is not echoed back whole
    assert client.post("/v1/completions", json=GOOD).status_code == 200  # still serving


def test_a_prompt_over_the_character_bound_is_refused_before_tokenizing(corpus_server):
    engine, client = corpus_server
    limit = prompt_char_limit(engine.base.tokenizer, engine.max_seq)
    response = client.post("/v1/completions", json={"prompt": "x" * (limit + 1)})
    assert response.status_code == 400 and f"'prompt' has {limit + 1} characters" in response.text
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (limit + 1)}]})
    assert response.status_code == 400 and f"'messages' has {limit + 5} characters" in response.text


def test_no_case_produced_a_server_error(corpus_server):
    engine, client = corpus_server
    statuses = engine.metrics.snapshot()["requests"]
    assert not any(name in statuses for name in ("RuntimeError", "ValueError", "OverflowError", "RecursionError"))
    assert client.get("/health").json()["status"] == "ok"
