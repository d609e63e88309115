"""The Ray Serve application on a real local Ray instance, two engine replicas of the tiny base (fp32):
outputs equal offline generation, adapter affinity seen in /metrics, tag moves, the single-process server's
4xx, and a replica killed under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from ray_setup import ADAPTERS, PROMPTS, make_base, metrics, per_replica, total

from adapterhub.adapter import random_adapter
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.server import serve_in_thread

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'adapterhub[ray]')")

MODELS = [None, "summarize", "sql:prod", "translate@v1"]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)


def test_adapters_change_the_output(offline):
    base_text = offline.complete(None, PROMPTS[0], 12)
    for task in ADAPTERS:
        assert offline.complete(task, PROMPTS[0], 12) != base_text, task


def test_mixed_adapters_on_two_replicas_equal_offline_generate(ray_app, offline):
    requests = [(MODELS[i % len(MODELS)], PROMPTS[i % len(PROMPTS)], 5 + i % 6) for i in range(16)]
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0} for m, p, n in requests]
    responses = asyncio.run(_post_all(ray_app.url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    for (model, prompt, n), response in zip(requests, responses):
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == (model or "tiny")
        assert body["choices"][0]["text"] == offline.complete(model, prompt, n), (model, prompt, n)
    # Streaming through the ingress: the chunks add up to the same text.
    with ray_app.client.stream("POST", "/v1/completions", json={**bodies[1], "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert len(chunks) >= 2 and "".join(c["choices"][0]["text"] for c in chunks) == offline.complete(*requests[1])
    _wait_for(lambda: total(ray_app.client.get("/metrics").text, "adapterhub_replicas") == 2, 30, "two replicas")


def test_n_choices_and_vllm_names_work_through_the_ingress(ray_app, tmp_path, offline):
    """The API's newer surface on Ray: `n` (a request per choice) and vLLM's load / unload_lora_adapter for a
    registry ref (a directory is refused: replicas load from the registry)."""
    model, prompt = MODELS[1], PROMPTS[0]
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "n": 2}
    response = ray_app.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == [offline.complete(model, prompt, 6)] * 2
    loaded = ray_app.client.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": model})
    assert loaded.status_code == 200, loaded.text
    named = ray_app.client.post("/v1/completions", json={**body, "model": "mine", "n": 1})
    assert named.json()["choices"][0]["text"] == offline.complete(model, prompt, 6)
    (tmp_path / "adapter").mkdir()
    directory = {"lora_name": "dir", "lora_path": str(tmp_path / "adapter")}
    refused = ray_app.client.post("/v1/load_lora_adapter", json=directory)
    assert refused.status_code == 400 and "registry" in refused.json()["error"]["message"]
    assert ray_app.client.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 200
    assert ray_app.client.post("/v1/completions", json={**body, "model": "mine", "n": 1}).status_code == 404


def test_requests_for_one_adapter_stay_on_the_replica_holding_it(ray_app, registry, offline):
    shapes = make_base().module_shapes()
    tasks = [f"affinity{i}" for i in range(4)]
    for i, task in enumerate(tasks):
        registry.push(random_adapter(shapes, r=8, seed=100 + i, target_modules=("q_proj", "v_proj")), task)
    time.sleep(1.5)  # replicas report every 0.5 s, the ingress collects every 0.5 s: the earlier tests' counts settle
    before = ray_app.client.get("/metrics").text
    for round_ in range(4):
        for task in tasks:
            response = ray_app.complete(model=task, prompt=PROMPTS[round_], max_tokens=3, temperature=0)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == offline.complete(task, PROMPTS[round_], 3)
    time.sleep(1.5)
    after = ray_app.client.get("/metrics").text
    misses = total(after, "adapterhub_adapter_misses_total") - total(before, "adapterhub_adapter_misses_total")
    hits = total(after, "adapterhub_adapter_hits_total") - total(before, "adapterhub_adapter_hits_total")
    # Sequential requests never fill a replica: each adapter is read once, by one replica, then always hit.
    assert (hits, misses) == (12, 4), after
    assert 0 < total(after, "adapterhub_adapter_hit_ratio") <= 1
    assert len(per_replica(after, "adapterhub_adapter_hits_total")) == 2


def test_a_moved_tag_is_picked_up(ray_app, registry, offline):
    shapes = make_base().module_shapes()
    registry.push(random_adapter(shapes, r=8, seed=200, target_modules=("q_proj", "v_proj")), "mover", tags=("prod",))
    first = ray_app.complete(model="mover:prod", prompt=PROMPTS[2], max_tokens=8, temperature=0).json()
    v2 = registry.push(random_adapter(shapes, r=8, seed=201, target_modules=("q_proj", "v_proj")), "mover")
    registry.tag(str(v2), "prod")
    second = ray_app.complete(model="mover:prod", prompt=PROMPTS[2], max_tokens=8, temperature=0).json()
    expected_v1, expected_v2 = offline.complete("mover@v1", PROMPTS[2], 8), offline.complete("mover@v2", PROMPTS[2], 8)
    assert expected_v1 != expected_v2
    assert first["choices"][0]["text"] == expected_v1
    assert second["choices"][0]["text"] == expected_v2


def test_adapters_load_and_unload_and_models_list_every_replicas_adapters(ray_app, registry):
    loaded = ray_app.client.post("/v1/adapters", json={"ref": "translate:prod"})
    assert loaded.status_code == 200 and loaded.json()["digest"] == registry.resolve("translate:prod").digest

    def listed():
        data = ray_app.client.get("/v1/models").json()["data"]
        return {m["id"] for m in data if m["kind"] == "adapter"}

    _wait_for(lambda: "translate@v1" in listed(), 10, "the loaded adapter in /v1/models")
    kinds = {m["kind"] for m in ray_app.client.get("/v1/models").json()["data"]}
    assert kinds == {"base", "adapter", "task"}
    # The router learns which replica holds an adapter from the replicas' periodic reports (Ray Serve's
    # multiplexing): until the holder's report arrives, a DELETE may reach the other replica, which answers 400
    # (not loaded there). Once routed to the holder it unloads.
    def unload():
        response = ray_app.client.delete("/v1/adapters/translate:prod")
        assert response.status_code in (200, 400), response.text
        return response if response.status_code == 200 else None

    unloaded = _wait_for(unload, 15, "a DELETE routed to the replica holding the adapter")
    assert unloaded.json() == {**loaded.json(), "loaded": False}
    assert ray_app.client.post("/v1/adapters", json={"ref": "tiny"}).status_code == 400
    health = ray_app.client.get("/health").json()
    assert health["status"] == "ok" and health["base"] == "tiny"


BAD = [
    b'{"prompt": "x",',
    b"[1, 2]",
    {"prompt": "hi", "temperature": -0.5},
    {"prompt": "hi", "max_tokens": 0},
    {"prompt": "hi", "max_tokens": 10**6},
    {"prompt": "hi", "n": 0},
    {"prompt": "hi", "tools": [{"type": "function"}]},
    {"prompt": {"x": 1}},
    {"prompt": [10**9]},
    {"prompt": "hi", "stream": "yes"},
    {"model": "no-such-task", "prompt": "hi"},
    {"model": "sql@v99", "prompt": "hi"},
    {"model": "Bad Name!", "prompt": "hi"},
]


def test_bad_requests_get_the_single_process_servers_4xx(ray_app, registry):
    wrong = random_adapter({"model.layers.0.self_attn.q_proj": (7, 5)}, r=2, target_modules=("q_proj",))
    registry.push(wrong, "other-base")
    engine = Engine(make_base(), registry, EngineConfig(max_batch=4))
    try:
        with serve_in_thread(create_app(engine, api_key="")) as url, httpx.Client(base_url=url, timeout=60) as local:
            for body in BAD:
                sent = {"content": body} if isinstance(body, bytes) else {"json": body}
                expected = local.post("/v1/completions", **sent)
                got = ray_app.client.post("/v1/completions", **sent)
                assert 400 <= expected.status_code < 500, body
                assert (got.status_code, got.json()) == (expected.status_code, expected.json()), body
            body = {"model": "other-base", "prompt": "hi"}
            expected, got = local.post("/v1/completions", json=body), ray_app.complete(**body)
    finally:
        engine.close()
    # Checked by the replica against its base: the same status and error class, naming the module.
    assert got.status_code == expected.status_code == 422
    assert got.json()["error"]["code"] == expected.json()["error"]["code"] == "IncompatibleAdapterError"
    assert "q_proj" in got.json()["error"]["message"] and "other-base" in got.json()["error"]["message"]
    assert ray_app.client.get("/v1/nothing").status_code == 404
    assert ray_app.complete(model="sql", prompt="hi", max_tokens=2).status_code == 200


def test_a_killed_replica_loses_no_request_and_is_replaced(ray_app, offline):
    pids = _replica_pids(ray_app)
    assert len(pids) == 2
    retries_before = total(ray_app.client.get("/metrics").text, "adapterhub_ingress_retries_total")
    # 16 requests, more than one replica's 8 rows: both replicas decode some of them, long enough (the tiny model
    # decodes a 128-token request in a fraction of a second) to be seen busy by the polls below.
    requests = [(MODELS[i % len(MODELS)], PROMPTS[i % len(PROMPTS)], 512) for i in range(16)]
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0} for m, p, n in requests]

    async def burst_and_kill():
        sending = asyncio.ensure_future(_post_all(ray_app.url, bodies))
        # Kill a replica while it decodes: both replicas report rows in their batch, none has answered yet.
        while True:
            await asyncio.sleep(0.2)
            text = (await asyncio.to_thread(ray_app.client.get, "/metrics")).text
            busy = {int(labels["pid"]) for n, labels, _ in metrics(text) if n == "adapterhub_replica_info"
                    and per_replica(text, "adapterhub_batch_size").get(labels["replica"], 0) > 0}
            assert not sending.done(), "the requests finished before both replicas were seen busy"
            if busy == pids:
                break
        victim = max(pids)
        os.kill(victim, signal.SIGKILL)
        return victim, await sending

    victim, responses = asyncio.run(burst_and_kill())
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    for (model, prompt, n), response in zip(requests, responses):
        assert response.json()["choices"][0]["text"] == offline.complete(model, prompt, n)
    text = ray_app.client.get("/metrics").text
    assert total(text, "adapterhub_ingress_retries_total") > retries_before  # the victim's rows were sent again
    # Ray Serve starts a new replica; both serve again.
    replaced = _wait_for(lambda: (lambda now: len(now) == 2 and victim not in now and now)(_replica_pids(ray_app)),
                         120, "a replacement replica")
    assert len(replaced - pids) == 1
    again = asyncio.run(_post_all(ray_app.url, bodies[:8]))
    assert [r.status_code for r in again] == [200] * 8


def _replica_pids(ray_app) -> set[int]:
    samples = metrics(ray_app.client.get("/metrics").text)
    return {int(labels["pid"]) for name, labels, _ in samples if name == "adapterhub_replica_info"}


def test_a_stream_on_a_killed_replica_ends_with_a_retryable_error(ray_app):
    """Text already went out, so the ingress cannot send the request again: the stream ends, promptly, with an
    error event naming a retryable 503 error, then [DONE]; and the app keeps serving."""
    _wait_for(lambda: len(_replica_pids(ray_app)) == 2, 120, "two replicas")
    _wait_for(lambda: total(ray_app.client.get("/metrics").text, "adapterhub_batch_size") == 0, 30,
              "idle replicas")  # so the one busy replica below is this stream's
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.Client(base_url=ray_app.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")  # text is flowing

        def serving_replica():  # the one replica with a row in its batch: this stream's
            text = ray_app.client.get("/metrics").text
            busy = [labels["pid"] for n, labels, _ in metrics(text) if n == "adapterhub_replica_info"
                    and per_replica(text, "adapterhub_batch_size").get(labels["replica"], 0) > 0]
            return int(busy[0]) if len(busy) == 1 else None

        os.kill(_wait_for(serving_replica, 30, "the replica decoding the stream"), signal.SIGKILL)
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
    assert time.monotonic() - killed_at < 30
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "ReplicaUnavailableError" and "send the request again" in error["message"]
    _wait_for(lambda: len(_replica_pids(ray_app)) == 2, 120, "a replacement replica")
    assert ray_app.complete(model="sql", prompt="hi", max_tokens=2).status_code == 200
