"""HTTP API contract: errors as JSON with the right status, queue bound, auth, models, adapters, metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
from serving_setup import PROMPTS, make_base

from adapterhub.adapter import random_adapter
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.server import serve_in_thread


def assert_error(response: httpx.Response, status: int, code: str, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and isinstance(error["type"], str)
    assert words in error["message"], error["message"]


def test_bad_requests_get_400_with_a_json_message(served):
    max_seq = served.engine.max_seq
    post = served.client.post
    assert_error(post("/v1/completions", content=b'{"prompt": "x",'), 400, "RequestError", "not valid JSON")
    assert_error(post("/v1/completions", content=b'[1, 2]'), 400, "RequestError", "JSON object")
    assert_error(served.complete(prompt="hi", temperature=-0.5), 400, "RequestError", "temperature")
    assert_error(served.complete(prompt="hi", max_tokens=max_seq + 1), 400, "RequestError", "exceeds the context")
    assert_error(served.complete(prompt="hi", max_tokens=0), 400, "RequestError", "max_tokens")
    assert_error(served.complete(prompt=[1] * max_seq, max_tokens=1), 400, "RequestError", "prompt has")
    assert_error(served.complete(prompt="hi", n=17), 400, "RequestError", "'n'")
    assert_error(served.complete(prompt={"x": 1}), 400, "RequestError", "'prompt'")
    assert_error(served.complete(prompt="hi", max_tokens="ten"), 400, "RequestError", "max_tokens")
    assert_error(served.complete(prompt=[10**9]), 400, "RequestError", "outside the vocabulary")
    # The server is still up and serving.
    assert served.complete(prompt="hi", max_tokens=2).status_code == 200


def test_unknown_adapter_is_404_and_incompatible_adapter_is_422(served, registry):
    assert_error(served.complete(model="no-such-task", prompt="hi"), 404, "RefNotFoundError", "no-such-task")
    assert_error(served.complete(model="sql@v99", prompt="hi"), 404, "RefNotFoundError", "sql@v99")
    wrong = random_adapter({"model.layers.0.self_attn.q_proj": (7, 5)}, r=2, target_modules=("q_proj",))
    registry.push(wrong, "other-base")
    assert_error(served.complete(model="other-base", prompt="hi"), 422, "IncompatibleAdapterError", "q_proj")
    assert served.complete(model="sql", prompt="hi", max_tokens=2).status_code == 200


def test_unknown_route_and_method_are_json_errors(served):
    assert served.client.get("/v1/nothing").status_code == 404
    assert "error" in served.client.get("/v1/nothing").json()
    assert served.client.get("/v1/completions").status_code == 405


def test_models_lists_base_loaded_adapters_and_registry_tasks(served):
    assert served.client.post("/v1/adapters", json={"ref": "translate:prod"}).status_code == 200
    data = served.client.get("/v1/models").json()["data"]
    by_kind = {}
    for m in data:
        by_kind.setdefault(m["kind"], set()).add(m["id"])
    assert by_kind["base"] == {"tiny"}
    assert "translate@v1" in by_kind["adapter"]
    assert {"summarize", "sql", "translate"} <= by_kind["task"]


def test_load_and_unload_an_adapter(served):
    loaded = served.client.post("/v1/adapters", json={"ref": "summarize@v1"}).json()
    assert loaded["loaded"] and loaded["digest"].startswith("sha256:")
    assert loaded["digest"] in served.engine.resident()
    unloaded = served.client.delete("/v1/adapters/summarize@v1")
    assert unloaded.status_code == 200 and unloaded.json()["digest"] == loaded["digest"]
    assert loaded["digest"] not in served.engine.resident()
    assert_error(served.client.delete("/v1/adapters/summarize@v1"), 400, "RequestError", "not loaded")
    assert_error(served.client.post("/v1/adapters", json={"ref": "nope"}), 404, "RefNotFoundError", "nope")
    # Requests load it again on demand.
    assert served.complete(model="summarize", prompt="hi", max_tokens=2).status_code == 200


def test_metrics_are_prometheus_text(served):
    served.complete(prompt="hi", max_tokens=3)
    text = served.client.get("/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    for name in ("adapterhub_queue_depth", "adapterhub_batch_size", "adapterhub_tokens_per_second",
                 "adapterhub_adapter_loads_total", "adapterhub_adapter_evictions_total"):
        assert name in samples
    assert float(samples['adapterhub_requests_total{status="ok"}']) >= 1
    served.complete(prompt="hi", temperature=-1)
    assert "adapterhub_requests_total{status=\"RequestError\"}" in served.client.get("/metrics").text
    assert float(samples["adapterhub_generated_tokens_total"]) >= 3
    assert "# TYPE adapterhub_generated_tokens_total counter" in text


def test_chat_completions_follow_the_tokenizer_template(served):
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "temperature": 0}
    response = served.client.post("/v1/chat/completions", json=body)
    if served.engine.base.tokenizer.has_chat_template:
        assert response.status_code == 200
        message = response.json()["choices"][0]["message"]
        assert message["role"] == "assistant" and response.json()["object"] == "chat.completion"
        with served.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x and x != "data: [DONE]"]
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
        parts = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]}
        assert served.client.post("/v1/chat/completions", json=parts).json()["choices"][0]["message"] == message
        assert_error(served.client.post("/v1/chat/completions", json={"messages": []}), 400, "RequestError",
                     "'messages'")
    else:
        assert_error(response, 400, "RequestError", "chat template")


def test_queue_bound_gives_429_and_the_server_stays_up():
    engine = Engine(make_base(), None, EngineConfig(max_batch=1, max_queue=2))

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0})
                for _ in range(10)))

    try:
        with serve_in_thread(create_app(engine, api_key="")) as url:
            statuses = [r.status_code for r in asyncio.run(burst(url))]
            assert 429 in statuses and statuses.count(200) >= 2, statuses
            assert set(statuses) == {200, 429}
            rejected = next(r for r in asyncio.run(burst(url)) if r.status_code == 429)
            assert_error(rejected, 429, "QueueFullError", "max_queue=2")
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    finally:
        engine.close()


def test_bearer_token_is_required_when_configured():
    engine = Engine(make_base(), None, EngineConfig(max_batch=2))
    try:
        with serve_in_thread(create_app(engine, api_key="s3cret")) as url:
            for header, status in [(None, 401), ("Bearer wrong", 401), ("s3cret", 401), ("Bearer s3cret", 200)]:
                headers = {"Authorization": header} if header else {}
                r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
                assert r.status_code == status, header
                if status == 401:
                    assert_error(r, 401, "AuthError", "ADAPTERHUB_API_KEY")
            assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health checks need no key
    finally:
        engine.close()


def test_a_failing_decode_step_fails_its_requests_with_500_and_the_server_keeps_serving():
    base = make_base()
    engine = Engine(base, None, EngineConfig(max_batch=4))
    real_decode, calls = base.decode, []

    def flaky_decode(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kernel failure")
        return real_decode(*args)

    base.decode = flaky_decode
    try:
        with serve_in_thread(create_app(engine, api_key="")) as url:
            body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
            failed = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert_error(failed, 500, "RuntimeError", "simulated kernel failure")
            ok = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
            assert engine.metrics.snapshot()["requests"] == {"RuntimeError": 1, "ok": 1}
    finally:
        engine.close()


def test_the_401_error_is_in_the_one_error_hierarchy():
    from adapterhub import errors
    from adapterhub.serve import api
    assert api.AuthError is errors.AuthError and errors.AuthError.http_status == 401
    assert issubclass(errors.AuthError, errors.RequestError)  # `except RequestError` still catches it
