"""The engine under a KV cache budget of a few blocks: many concurrent mixed-adapter requests all finish with the
text each gets alone (fp32 greedy), rows are preempted and recomputed when blocks run out, and /metrics shows the
budget, the preemptions and every block back once the requests are done."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from serving_setup import PROMPTS, make_base, wait_until_serving

from adapterhub.cli import main
from adapterhub.errors import ConfigError
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig, default_kv_memory
from adapterhub.serve.server import serve_in_thread

REPO = Path(__file__).resolve().parents[2]
MODELS = [None, "summarize", "sql:prod", "translate@v1"]
BLOCKS = 5  # of 16 tokens: a prompt here is up to ~25 tokens, a finished row up to ~45 (3 blocks)


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_a_few_blocks_serve_many_concurrent_requests_equal_to_solo_runs(registry, offline):
    base = make_base()
    per_block = 16 * base.kv_bytes_per_token()
    engine = Engine(base, registry, EngineConfig(max_batch=8, max_seq=64, kv_cache_memory=BLOCKS * per_block))
    requests = [(MODELS[i % len(MODELS)], PROMPTS[i % len(PROMPTS)], 10 + i % 9) for i in range(24)]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": n, "temperature": 0})
                for m, p, n in requests))

    try:
        with serve_in_thread(create_app(engine, api_key="")) as url:
            responses = asyncio.run(send_all(url))
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        engine.close()
    assert [r.status_code for r in responses] == [200] * len(requests)
    for (model, prompt, n), response in zip(requests, responses):
        assert response.json()["choices"][0]["text"] == offline.complete(model, prompt, n), (model, prompt, n)
    assert _metric(metrics, "adapterhub_kv_cache_blocks") == BLOCKS
    assert _metric(metrics, "adapterhub_kv_cache_bytes") == (BLOCKS + 1) * per_block  # + the padding block
    assert _metric(metrics, "adapterhub_kv_cache_blocks_free") == BLOCKS  # every block given back
    preemptions = _metric(metrics, "adapterhub_preemptions_total")
    assert preemptions >= 1 and preemptions == engine.metrics.snapshot()["preemptions"]
    assert _metric(metrics, "adapterhub_adapter_pool_bytes") > 0  # the three adapters' stacks
    assert engine.metrics.snapshot()["requests"] == {"ok": len(requests)}


def test_the_budget_must_hold_one_request_and_defaults_to_a_bounded_share():
    base = make_base()
    one_row = 4 * 16 * base.kv_bytes_per_token()  # max_seq 64 = 4 blocks
    with pytest.raises(ConfigError, match="less than one request of max_seq=64"):
        Engine(base, None, EngineConfig(max_seq=64, kv_cache_memory=one_row - 1))
    # The default: 1/8 of what is available, at most the base's weights and what max_batch full rows use,
    # at least one full row.
    assert default_kv_memory(base, 16, 64, available=8 * 2 * one_row) == 2 * one_row
    assert default_kv_memory(base, 16, 64, available=1) == one_row
    assert default_kv_memory(base, 2, 64, available=2**40) == 2 * one_row
    weights = base.weight_bytes()
    assert default_kv_memory(base, 10**6, 64, available=2**50) == weights
    engine = Engine(base, None, EngineConfig(max_batch=4, max_seq=64))
    try:
        assert engine.metrics.snapshot()["kv_cache_bytes"] == (4 * 4 + 1) * 16 * base.kv_bytes_per_token()
        assert "KV cache" in engine.memory_summary() and "adapter pool 0 bytes" in engine.memory_summary()
    finally:
        engine.close()


def test_serve_takes_the_budget_and_the_adapter_dtype_and_prints_them(registry):
    """`adapterhub serve --kv-cache-memory 1MB --adapter-dtype float32`: the tiny base in bf16 holds 2,048 bytes
    of keys and values per token (2 x 4 layers x 4 KV heads x 32 x 2 bytes), so 1,000,000 bytes are 30 blocks."""
    bad = CliRunner().invoke(main, ["serve", "--kv-cache-memory", "lots"])
    assert bad.exit_code != 0 and "--kv-cache-memory 'lots' is not a size" in bad.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--port", str(port),
               "--registry", registry.location, "--max-seq", "64", "--kv-cache-memory", "1MB",
               "--adapter-dtype", "float32"]
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERHUB_API_KEY"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "model": "sql:prod"}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert _metric(metrics, "adapterhub_kv_cache_blocks") == 30
    assert _metric(metrics, "adapterhub_adapter_pool_bytes") > 0
    assert "KV cache 1.0 MiB: 30 blocks of 16 tokens (480 tokens, 2048 bytes each)" in output
    assert "adapter pool 0 bytes now, in float32" in output


def test_a_preempted_row_keeps_its_penalty_counts(registry):
    """Penalties count a row's generated tokens per cache row; a preempted row resumes in another row with its
    counts rebuilt, so under a tight budget every answer equals the same request served alone."""
    bodies = [{"model": MODELS[i % len(MODELS)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 14 + i % 5,
               "temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
              for i in range(12)]

    def serve(config: EngineConfig, concurrent: bool):
        engine = Engine(make_base(), registry, config)
        try:
            with serve_in_thread(create_app(engine, api_key="")) as url:
                if concurrent:
                    async def send_all():
                        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
                    responses = asyncio.run(send_all())
                else:
                    responses = [httpx.post(f"{url}/v1/completions", json=b, timeout=300) for b in bodies]
            return [r.json()["choices"][0]["text"] for r in responses], engine.metrics.snapshot()["preemptions"]
        finally:
            engine.close()

    per_block = 16 * make_base().kv_bytes_per_token()
    alone, _ = serve(EngineConfig(max_batch=8, max_seq=64), concurrent=False)
    tight, preemptions = serve(EngineConfig(max_batch=8, max_seq=64, kv_cache_memory=BLOCKS * per_block), True)
    assert preemptions >= 1 and tight == alone
