"""Bounded churn: requests, adapter loads/evictions, cancelled streams and errors; resident memory stays flat.

Default ~20 s; `ADAPTERHUB_CHURN_SECONDS=120` for the 2-minute run. Prints the RSS figures (`-s`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time

import httpx
import pytest
from serving_setup import ADAPTERS, PROMPTS, make_base

from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.server import serve_in_thread

MODELS = [None, *ADAPTERS]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


async def churn_worker(client: httpx.AsyncClient, rng: random.Random, until: float, counts: dict) -> None:
    while time.monotonic() < until:
        kind = rng.choices(["complete", "stream-cancel", "bad", "unknown"], weights=[6, 2, 1, 1])[0]
        body = {"model": rng.choice(MODELS), "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 24),
                "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 9)}
        if kind == "complete":
            r = await client.post("/v1/completions", json=body)
        elif kind == "stream-cancel":  # the client goes away mid-stream: the row must be freed
            async with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 40, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
        elif kind == "bad":
            r = await client.post("/v1/completions", json={**body, "temperature": -1})
        else:
            r = await client.post("/v1/completions", json={**body, "model": "missing-task"})
        counts[(kind, r.status_code)] = counts.get((kind, r.status_code), 0) + 1


@pytest.mark.slow
def test_churn_keeps_resident_memory_flat(registry):
    seconds = float(os.environ.get("ADAPTERHUB_CHURN_SECONDS", "20"))
    # Two slots for three adapters: nearly every switch loads one and evicts another.
    engine = Engine(make_base(max_adapters=2), registry, EngineConfig(max_batch=4, max_queue=64))
    counts: dict = {}

    async def phase(url: str, duration: float, seed: int) -> None:
        until = time.monotonic() + duration
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await asyncio.gather(*(churn_worker(client, random.Random(seed * 100 + i), until, counts)
                                   for i in range(6)))

    try:
        with serve_in_thread(create_app(engine, api_key="")) as url:
            asyncio.run(phase(url, seconds * 0.25, seed=1))  # warm-up: allocator pools, caches, compiled paths
            gc.collect()
            before = rss_mib()
            asyncio.run(phase(url, seconds * 0.75, seed=2))
            gc.collect()
            after = rss_mib()
            stats = engine.metrics.snapshot()
    finally:
        engine.close()
    print(f"\nchurn {seconds:.0f} s: RSS {before:.1f} MiB -> {after:.1f} MiB ({after - before:+.1f} MiB); "
          f"requests {stats['requests']}, adapter loads {stats['adapter_loads']}, "
          f"evictions {stats['adapter_evictions']}, tokens {stats['tokens_total']}")
    assert set(counts) <= {("complete", 200), ("stream-cancel", 200), ("bad", 400), ("unknown", 404)}, counts
    assert stats["adapter_evictions"] >= 10 and stats["requests"].get("cancelled", 0) >= 1
    assert stats["batch_size"] == 0 and stats["queue_depth"] == 0  # every row and pin released
    assert after - before < 24, f"resident memory grew {after - before:.1f} MiB during churn"
