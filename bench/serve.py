"""Serving throughput and latency: concurrent HTTP clients, 16 adapters mixed vs one adapter.

    python -m bench.serve [--quick] [--clients 16] [--requests 96] [--max-tokens 32]

The server (tiny base, engine, uvicorn) runs in this process on 127.0.0.1; `--clients` asyncio
clients keep one request each in flight. Scenario "one": every request names the same adapter;
"mixed": each names one of 16 adapters at random (LoRA r=16 on q/k/v/o). Both scenarios run
alternately `--rounds` times; the table shows medians, and the ratio mixed / one (goal >= 0.85).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import httpx

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there was",
           "SELECT name FROM users WHERE", "Translate to German: good morning", "The weather today is"]


async def run_load(url: str, models: list[str], clients: int, requests: int, max_tokens: int, seed: int):
    """Returns (completion tokens / s, per-request latencies in s, mean completion tokens per request)."""
    rng = random.Random(seed)
    plan = [(rng.choice(models), rng.choice(PROMPTS)) for _ in range(requests)]
    latencies, tokens = [], 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while plan:
            model, prompt = plan.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                           "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return tokens / elapsed, latencies, tokens / requests


def load_in_process(url: str, models: list[str], requests: int, seed: int, *, clients: int, max_tokens: int):
    return asyncio.run(run_load(url, models, clients, requests, max_tokens, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer requests, one round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.max_tokens = 32, 1, 16

    from adapterhub.adapter import random_adapter
    from adapterhub.registry import Registry
    from adapterhub.runtime import load_base
    from adapterhub.serve.api import create_app
    from adapterhub.serve.engine import Engine, EngineConfig
    from adapterhub.serve.server import serve_in_thread

    base = load_base("tiny", max_adapters=args.adapters)
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-") as tmp:
        registry = Registry(tmp)
        tasks = [f"task{i:02d}" for i in range(args.adapters)]
        for i, task in enumerate(tasks):
            registry.push(random_adapter(base.module_shapes(), r=16, seed=i,
                                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj")), task)
        engine = Engine(base, registry, EngineConfig(max_batch=args.clients, max_queue=4 * args.clients))
        try:
            with serve_in_thread(create_app(engine)) as url:
                for task in tasks:  # load time is not what this measures
                    httpx.post(f"{url}/v1/adapters", json={"ref": task}, timeout=60).raise_for_status()
                # The clients run in another process, as real clients would: they must not compete with
                # the server for this process's GIL.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
                    load = functools.partial(load_in_process, url, clients=args.clients, max_tokens=args.max_tokens)
                    clients.submit(load, tasks, args.clients, 0).result()  # warm-up
                    results = {"one": [], "mixed": []}
                    for round_ in range(args.rounds):
                        for name, models in (("one", tasks[:1]), ("mixed", tasks)):
                            results[name].append(clients.submit(load, models, args.requests, round_).result())
        finally:
            engine.close()

    print(f"serving bench: tiny base, {args.clients} concurrent clients, {args.requests} requests x "
          f"{args.max_tokens} max tokens per scenario, {args.rounds} round(s), medians")
    print(f"{'scenario':<24} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'tok/req':>8} {'ratio':>6}")
    one_tps = statistics.median(tps for tps, _, _ in results["one"])
    for name, label in (("one", "1 adapter"), ("mixed", f"{args.adapters} adapters mixed")):
        tps = statistics.median(t for t, _, _ in results[name])
        per_request = statistics.mean(n for _, _, n in results[name])
        lat = sorted(x for _, ls, _ in results[name] for x in ls)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{label:<24} {tps:>9.0f} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f} {per_request:>8.1f} "
              f"{tps / one_tps:>5.2f}x")


if __name__ == "__main__":
    main()
