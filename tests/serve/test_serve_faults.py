"""Fault isolation: one request that fails on the engine thread (preparation, prefill, sampling) fails alone;
every other request in the same batch finishes and equals offline generation. A streamed request that fails
gets an SSE error event, then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving_setup import PROMPTS, make_base

from adapterhub.errors import RequestError
from adapterhub.serve import engine as engine_module
from adapterhub.serve import rows as rows_module
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.requests import SamplingParams
from adapterhub.serve.server import serve_in_thread

POISON_SEED = 4242  # marks the poisoned request; every other request is greedy
POISON = SamplingParams(max_tokens=12, temperature=0.7, seed=POISON_SEED)
MODELS = [None, "summarize", "sql:prod", "translate@v1", None]


@pytest.fixture
def engine(registry):
    engine = Engine(make_base(), registry, EngineConfig(max_batch=8))
    yield engine
    engine.close()


def run_together(engine: Engine, requests: list[tuple[str | None, str, SamplingParams]]) -> list:
    """Submits every request before the engine thread may admit one, so they share one prefill and one batch;
    returns each one's text, or the exception it failed with."""
    tokenizer = engine.base.tokenizer
    with engine._cv:  # the engine thread waits on this (reentrant) lock: nothing is admitted until all are queued
        handles = [engine.submit(tokenizer.encode(p), m, params, is_streaming=False) for m, p, params in requests]
    return [_outcome(handle) for handle in handles]


def _outcome(handle):
    try:
        return handle.result()[0]
    except Exception as error:
        return error


def healthy_requests(n: int = 5) -> list[tuple[str | None, str, SamplingParams]]:
    return [(MODELS[i % len(MODELS)], PROMPTS[i], SamplingParams(max_tokens=10 + i)) for i in range(n)]


def assert_only_the_poisoned_failed(outcomes, requests, offline, error_type, words):
    *healthy, poisoned = outcomes
    assert isinstance(poisoned, error_type) and words in str(poisoned), repr(poisoned)
    for (model, prompt, params), text in zip(requests, healthy):
        assert text == offline.complete(model, prompt, params.max_tokens), (model, prompt)


def test_top_k_that_torch_cannot_hold_fails_its_request_only(engine, offline, monkeypatch):
    # The HTTP edge and validate_request refuse top_k = 2**63 (400); without them the engine thread meets the
    # OverflowError while preparing the row, and must fail that request only.
    monkeypatch.setattr(engine_module, "validate_request", lambda *args: None)
    requests = healthy_requests()
    outcomes = run_together(engine, [*requests, (None, PROMPTS[0], SamplingParams(max_tokens=8, top_k=2**63))])
    # torch raises OverflowError or ValueError ("Overflow when unpacking long long"), by version
    assert_only_the_poisoned_failed(outcomes, requests, offline, (OverflowError, ValueError), "")
    assert engine.metrics.snapshot()["requests"] == {"ok": 5, type(outcomes[-1]).__name__: 1}


def test_validate_request_refuses_top_k_2_63_naming_the_range(engine):
    with pytest.raises(RequestError, match=r"top_k must be an integer in \[0, 2147483647\]"):
        engine.submit([1, 2, 3], None, SamplingParams(top_k=2**63))


def test_a_failing_preparation_fails_that_request_only(engine, offline, monkeypatch):
    real = rows_module._sampling_batch

    def poisoned(params, offsets):
        if any(p.seed == POISON_SEED for p in params):
            raise RuntimeError("injected preparation fault")
        return real(params, offsets)

    monkeypatch.setattr(rows_module, "_sampling_batch", poisoned)
    requests = healthy_requests()
    outcomes = run_together(engine, [*requests, (None, PROMPTS[1], POISON)])
    assert_only_the_poisoned_failed(outcomes, requests, offline, RuntimeError, "injected preparation fault")


def test_a_failing_prefill_is_retried_row_by_row_and_fails_that_request_only(engine, offline):
    base = engine.base
    real, batch_sizes = base.prefill, []
    poison_prompt = base.tokenizer.encode(PROMPTS[2])

    def poisoned(cache, rows, prompts, ids, prefix_adapters=None):
        batch_sizes.append(len(prompts))
        if any(list(p) == poison_prompt for p in prompts):
            raise RuntimeError("injected prefill fault")
        return real(cache, rows, prompts, ids, prefix_adapters)

    base.prefill = poisoned
    requests = [r for r in healthy_requests(6) if r[1] != PROMPTS[2]]
    outcomes = run_together(engine, [*requests, (None, PROMPTS[2], SamplingParams(max_tokens=8))])
    assert_only_the_poisoned_failed(outcomes, requests, offline, RuntimeError, "injected prefill fault")
    assert batch_sizes[0] == 6 and batch_sizes[1:] == [1] * 6  # one batch, then each row alone


def test_a_failing_sampling_step_fails_that_request_only(engine, offline, monkeypatch):
    real, failed_batches = rows_module.sample, []

    def poisoned(logits, params):
        if bool((params.seed == POISON_SEED).any()) and int(params.offset.max()) >= 3:
            failed_batches.append(logits.shape[0])
            raise RuntimeError("injected sampling fault")
        return real(logits, params)

    monkeypatch.setattr(rows_module, "sample", poisoned)
    requests = healthy_requests()
    outcomes = run_together(engine, [*requests, (None, PROMPTS[3], POISON)])
    assert_only_the_poisoned_failed(outcomes, requests, offline, RuntimeError, "injected sampling fault")
    assert len(failed_batches) == 2 and failed_batches[0] > 1 == failed_batches[1]  # the batch, then the row alone
    assert engine.metrics.snapshot()["batch_size"] == 0 and len(engine._rows) == 0


def test_a_failing_streamed_request_ends_with_an_error_event_and_done_while_others_succeed(
        engine, offline, monkeypatch):
    real = rows_module.sample

    def poisoned(logits, params):
        if bool((params.seed == POISON_SEED).any()) and int(params.offset.max()) >= 3:
            raise RuntimeError("injected fault in one row")  # not an AdapterHubError: a 500
        return real(logits, params)

    monkeypatch.setattr(rows_module, "sample", poisoned)
    healthy = [(MODELS[i], PROMPTS[i], 12 + i) for i in range(4)]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def stream_poisoned():
                body = {"prompt": PROMPTS[4], "max_tokens": 16, "temperature": 0.7, "seed": POISON_SEED,
                        "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    return response.status_code, [line async for line in response.aiter_lines() if line]

            posts = [client.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": n, "temperature": 0})
                     for m, p, n in healthy]
            return await asyncio.gather(stream_poisoned(), *posts)

    with serve_in_thread(create_app(engine, api_key="")) as url:
        (status, lines), *responses = asyncio.run(send_all(url))
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "choices" in events[0]  # it streamed tokens before the fault
    error = events[-1]["error"]
    assert error["code"] == "RuntimeError" and error["type"] == "server_error"
    assert "injected fault in one row" in error["message"]
    for (model, prompt, n), response in zip(healthy, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == offline.complete(model, prompt, n)


def test_http_top_k_2_63_is_a_400_naming_top_k_and_concurrent_requests_succeed(served, offline):
    healthy = [(MODELS[i], PROMPTS[i], 8 + i) for i in range(4)]

    async def send_all():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            bad = client.post("/v1/completions", json={"prompt": "hi", "temperature": 1, "top_k": 2**63})
            posts = [client.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": n, "temperature": 0})
                     for m, p, n in healthy]
            return await asyncio.gather(bad, *posts)

    bad, *responses = asyncio.run(send_all())
    assert bad.status_code == 400
    assert "'top_k' must be an integer in [0, 2147483647]" in bad.json()["error"]["message"]
    for (model, prompt, n), response in zip(healthy, responses):
        assert response.json()["choices"][0]["text"] == offline.complete(model, prompt, n)
