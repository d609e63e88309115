"""Scaling out on Ray Serve: engine replicas of the tiny base, adapter-affinity routing against Ray's default
routing, and the single-process server, on this machine; then a simulation of the same routing at scale.

    python -m bench.scaleout [--quick] [--replicas 1,2,4] [--simulate-only]

64 adapters (LoRA r=8 on q/v), requests drawn with Zipf popularity (s=1.1), pool 8 adapters per replica (and
in the single process), `--clients` concurrent HTTP clients in another process, one round per setting after a
warm-up that fills the pools. Each replica has the single process's max_batch (= clients) rows, so a replica
holding an adapter has room for its traffic, and cpus / replicas of Ray's CPUs (torch threads: that, at least 1). Hit ratio: requests whose adapter was resident on arrival (from
/metrics; the single process: requests minus adapter loads). This machine is CPU-bound, so replicas share
its cores: more replicas cannot give more tokens/s than the cores allow.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import httpx
import numpy as np

from bench.scaleout_sim import report as simulation_report
from bench.scaleout_sim import zipf_weights
from bench.serve import PROMPTS, run_plan


def zipf_plan(tasks: list[str], requests: int, s: float, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    models = rng.choice(len(tasks), size=requests, p=zipf_weights(len(tasks), s))
    return [(tasks[m], PROMPTS[i % len(PROMPTS)]) for i, m in enumerate(models.tolist())]


def load_in_process(url: str, plan, clients: int, max_tokens: int):
    return asyncio.run(run_plan(url, plan, clients, max_tokens))[:2]


def hit_counts(url: str) -> tuple[float, float]:
    """(hits, misses) summed over the replicas on /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    sums = {"adapterhub_adapter_hits_total": 0.0, "adapterhub_adapter_misses_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums["adapterhub_adapter_hits_total"], sums["adapterhub_adapter_misses_total"]


def measure(url: str, load, warmup, plan, hits_of) -> dict:
    """Runs the warm-up, then the plan; the hit ratio over the plan only."""
    load(warmup)
    time.sleep(1.5)  # replicas report their counters every 0.5 s
    h0, m0 = hits_of()
    tps, latencies = load(plan)
    time.sleep(1.5)
    h1, m1 = hits_of()
    latencies.sort()
    return {"tps": tps, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "hit": (h1 - h0) / max(1.0, (h1 - h0) + (m1 - m0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--simulate-only", action="store_true", help="only the simulation (no Ray, seconds)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 96, 12
    simulation = simulation_report(zipf_s=args.zipf, requests=50_000 if args.quick else 200_000)
    if not args.simulate_only:
        rows = run_real(args)
        print(f"scale-out bench: tiny base (bf16), {args.adapters} adapters (Zipf s={args.zipf}), pool {args.pool} per "
              f"replica, {args.clients} clients, {args.requests} requests x {args.max_tokens} max tokens, "
              f"{os.cpu_count()} CPUs")
        print(f"{'setting':<28} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'hit ratio':>9} {'ratio':>6}")
        single = rows[0][1]["tps"]
        for name, r in rows:
            print(f"{name:<28} {r['tps']:>9.0f} {r['p50'] * 1e3:>8.0f} {r['p99'] * 1e3:>8.0f} {r['hit']:>9.3f} "
                  f"{r['tps'] / single:>5.2f}x")
        print()
    print("\n".join(simulation))


def run_real(args) -> list[tuple[str, dict]]:
    import ray
    from ray import serve

    from adapterhub.adapter import random_adapter
    from adapterhub.registry import Registry
    from adapterhub.runtime import load_base
    from adapterhub.serve.api import create_app
    from adapterhub.serve.engine import Engine, EngineConfig
    from adapterhub.serve.ray import APP_NAME, RayServeConfig, build_app
    from adapterhub.serve.ray.app import wait_until_running
    from adapterhub.serve.server import serve_in_thread

    cpus = os.cpu_count() or 2
    rows = []
    base = load_base("tiny", max_adapters=args.pool)
    tasks = [f"task{i:02d}" for i in range(args.adapters)]
    warmup = zipf_plan(tasks, max(64, args.requests // 2), args.zipf, seed=1)
    plan = zipf_plan(tasks, args.requests, args.zipf, seed=2)
    with tempfile.TemporaryDirectory(prefix="adapterhub-scaleout-") as tmp, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        registry = Registry(tmp)
        for i, task in enumerate(tasks):
            registry.push(random_adapter(base.module_shapes(), r=8, seed=i, target_modules=("q_proj", "v_proj")), task)

        def load(url, plan_):
            return clients.submit(functools.partial(load_in_process, url, plan_, args.clients, args.max_tokens)).result()

        engine = Engine(base, registry, EngineConfig(max_batch=args.clients, max_queue=4 * args.clients))
        try:
            with serve_in_thread(create_app(engine)) as url:
                def single_hits():
                    stats = engine.metrics.snapshot()
                    done = sum(stats["requests"].values())
                    return done - stats["adapter_loads"], stats["adapter_loads"]
                rows.append(("single process", measure(url, functools.partial(load, url), warmup, plan, single_hits)))
        finally:
            engine.close()
        del base

        os.environ.setdefault("PYTHONPATH", os.getcwd())
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            port = 18000 + os.getpid() % 1000
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            for n in (int(x) for x in args.replicas.split(",")):
                for routing in ("multiplexed", "default"):
                    config = RayServeConfig(base="tiny", registry=tmp, replicas=n, max_adapters=args.pool,
                                            max_batch=args.clients, max_queue=4 * args.clients,
                                            replica_cpus=cpus / n, routing=routing)
                    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
                    wait_until_running(600)
                    time.sleep(2.0)  # every replica reports to the board
                    result = measure(url, functools.partial(load, url), warmup, plan, functools.partial(hit_counts, url))
                    rows.append((f"{n} replica(s), {routing}", result))
                    serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
