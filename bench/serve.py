"""Serving throughput and latency: concurrent HTTP clients, 16 adapters mixed vs one adapter.

    python -m bench.serve [--quick] [--clients 16] [--requests 96] [--max-tokens 32]

The server (tiny base, engine, uvicorn) runs in this process on 127.0.0.1; `--clients` asyncio
clients keep one request each in flight. Scenario "one": every request names the same adapter;
"mixed": each names one of 16 adapters at random (LoRA r=16 on q/k/v/o). Both scenarios run
alternately `--rounds` times; the table shows medians, and the ratio mixed / one (goal >= 0.85).

    python -m bench.serve --memory [--concurrent 64] [--prompt-tokens 512]

`--memory`: a 135M Llama-architecture base (hidden 576, 30 layers, 9 / 3 heads, vocab 49152, as SmolLM2-135M)
built from its config by transformers with random weights and saved (no download) is served by
`adapterhub serve` with default settings in a child process: its resident memory idle (VmRSS), then
`--concurrent` requests of `--prompt-tokens`-token prompts sent at once, which fit the KV budget or wait
for it (preemptions counted from /metrics), and the peak resident memory (VmHWM).
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


async def run_plan(url: str, plan: list[tuple[str, str]], clients: int, max_tokens: int):
    """(completion tokens / s, per-request latencies in s, completion tokens) of `plan`, (model, prompt) pairs in
    order, sent by `clients` concurrent clients; a non-200 answer raises with a plain message (it may cross
    back from a clients' process)."""
    queue = list(reversed(plan))
    latencies, tokens = [], 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            model, prompt = queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                           "max_tokens": max_tokens, "temperature": 0})
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code} for {model}: {r.text[:500]}")
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return tokens / (time.perf_counter() - started), latencies, tokens


async def run_load(url: str, models: list[str], clients: int, requests: int, max_tokens: int, seed: int):
    """Returns (completion tokens / s, per-request latencies in s, mean completion tokens per request)."""
    rng = random.Random(seed)
    plan = [(rng.choice(models), rng.choice(PROMPTS)) for _ in range(requests)]
    rate, latencies, tokens = await run_plan(url, plan, clients, max_tokens)
    return rate, latencies, tokens / requests


def load_in_process(url: str, models: list[str], requests: int, seed: int, *, clients: int, max_tokens: int):
    return asyncio.run(run_load(url, models, clients, requests, max_tokens, seed))


SMOL_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)


def build_135m(path) -> None:
    """The 135M config's model with transformers' random init, saved in bf16, and the byte tokenizer."""
    import torch
    import transformers

    from adapterhub.runtime.model.tiny import byte_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOL_135M))
    model.to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save(path)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def _burst(url: str, n: int, prompt_tokens: int, max_tokens: int):
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt_tokens - 1)) for _ in range(n)]
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json={
            "prompt": p, "max_tokens": max_tokens, "temperature": 0}) for p in prompts))


def run_memory(args) -> None:
    import os
    import socket
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="adapterhub-135m-") as tmp:
        build_135m(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, ADAPTERHUB_HOME=f"{tmp}/registry")
        cmd = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--base", tmp, "--port", str(port)]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            time.sleep(5)  # idle
            idle = _status_kib(server.pid, "VmRSS") / 1024
            started = time.perf_counter()
            responses = asyncio.run(_burst(url, args.concurrent, args.prompt_tokens, args.max_tokens))
            elapsed = time.perf_counter() - started
            metrics = httpx.get(f"{url}/metrics").text
            peak, after = _status_kib(server.pid, "VmHWM") / 1024, _status_kib(server.pid, "VmRSS") / 1024
        finally:
            server.terminate()
            banner = server.communicate(timeout=60)[0]
    codes = sorted({r.status_code for r in responses})
    usage = [r.json()["usage"] for r in responses if r.status_code == 200]
    print("server start:\n  " + "\n  ".join(line for line in banner.splitlines() if line.startswith("adapterhub:")))
    print("135M Llama (hidden 576, 30 layers, 9/3 heads, vocab 49152), `adapterhub serve` defaults (NF4, bf16)")
    print(f"idle resident memory: {idle:.0f} MiB")
    print(f"{args.concurrent} concurrent requests, {statistics.mean(u['prompt_tokens'] for u in usage):.0f}-token "
          f"prompts, {args.max_tokens} max tokens: status codes {codes}, {len(usage)} completed in {elapsed:.1f} s, "
          f"{int(_metric(metrics, 'adapterhub_preemptions_total'))} preemptions; KV budget "
          f"{_metric(metrics, 'adapterhub_kv_cache_bytes') / 2**20:.1f} MiB "
          f"({int(_metric(metrics, 'adapterhub_kv_cache_blocks'))} blocks of "
          f"{int(_metric(metrics, 'adapterhub_kv_cache_block_tokens'))} tokens)")
    print(f"resident memory: peak {peak:.0f} MiB, after the burst {after:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer requests, one round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--memory", action="store_true", help="the 135M base's idle memory and a burst of long prompts")
    parser.add_argument("--concurrent", type=int, default=64, help="--memory: requests sent at once")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="--memory: tokens per prompt")
    args = parser.parse_args()
    if args.memory:
        return run_memory(args)
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
