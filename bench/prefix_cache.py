"""Time to prefill a prompt whose start is in the prefix cache, against the same prompt with caching off.

A row of `--prompt` tokens shares all of its full blocks but the last with an earlier request's prompt (random
tokens, the base), as a shared system prompt would; `base.prefill` of that row is timed (median of `--repeats`,
the row freed between calls) with `prefix_adapters` (the cached blocks shared, the last block computed) and
without (every token computed). Also the cost of the keys alone (`block_keys`), which every prefill with
caching on pays.

    python -m bench.prefix_cache [--model DIR] [--quantize nf4|none] [--prompt 1024] [--repeats 5]

--engine instead serves `--requests` requests through the serving engine (serve/engine.py, no HTTP), all
submitted at once, each a shared system prompt of `--prompt` tokens and its own 16-token question, `--max-tokens`
greedy tokens each, max_batch 8: caching off and on alternate for `--rounds` rounds, each with a fresh engine
on the same base (so the first request of a round computes the system prompt); it prints the medians of the
wall time, completion tokens/s and request latency (submission to the last token: median and 90th percentile
over the requests), the prompt tokens found cached, and the ratios on / off. (Time to the first token is not
shown: a random model's bytes are seldom whole UTF-8 characters, so text arrives at the end.)

    python -m bench.prefix_cache --engine [--prompt 512] [--requests 32] [--max-tokens 16] [--rounds 3]

Without --model it builds bench/serve.py's 135M config (random weights, bf16) in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from adapterhub.runtime import load_base
from adapterhub.runtime.model.kv_cache import BLOCK_SIZE
from adapterhub.runtime.model.prefix_cache import block_keys
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.requests import Finished, SamplingParams
from bench.serve import build_135m
from bench.timing import median_seconds


def run(model: str, quantize: str | None, prompt_tokens: int, repeats: int) -> None:
    base = load_base(model, quantize=quantize, compute_dtype=torch.bfloat16)
    rng = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 250, ((prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE,), generator=rng).tolist()
    prompt = shared + torch.randint(0, 250, (prompt_tokens - len(shared),), generator=rng).tolist()
    for use in (False, True):
        cache = base.new_cache(2, prompt_tokens + BLOCK_SIZE)
        adapters = [""] if use else None
        base.prefill(cache, [0], [shared + [1] * BLOCK_SIZE], None, prefix_adapters=adapters)  # the earlier request

        def prefill():
            cache.free([1])
            base.prefill(cache, [1], [prompt], None, prefix_adapters=adapters)

        seconds = median_seconds(prefill, repeats)
        label = f"caching on ({cache.prefix_hits // (repeats + 1)} of {prompt_tokens} tokens cached)" if use else "off"
        print(f"prefill of {prompt_tokens} tokens, {label}: {seconds * 1e3:.1f} ms")
    keys = median_seconds(lambda: block_keys("sha256:" + "0" * 64, prompt, BLOCK_SIZE), 100)
    print(f"block_keys of {prompt_tokens} tokens: {keys * 1e3:.3f} ms")


def serve_round(base, prompts: list[list[int]], max_tokens: int, enable: bool) -> dict:
    """One round through a fresh engine: every prompt submitted at once, each consumed by its own thread."""
    engine = Engine(base, None, EngineConfig(max_batch=8, max_seq=max(map(len, prompts)) + max_tokens + 16,
                                             enable_prefix_caching=enable))
    done, cached, tokens = [0.0] * len(prompts), [0] * len(prompts), [0] * len(prompts)
    try:
        start = time.perf_counter()
        handles = [engine.submit(p, None, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]

        def consume(i: int) -> None:
            for event in handles[i].events():
                if isinstance(event, Finished):
                    done[i] = time.perf_counter() - start
                    cached[i], tokens[i] = event.cached_tokens, event.completion_tokens

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        engine.close()
    latency = sorted(done)
    return {"wall": wall, "tok/s": sum(tokens) / wall, "latency": statistics.median(latency),
            "latency90": latency[int(0.9 * (len(latency) - 1))], "cached": sum(cached)}


def run_engine(model: str, quantize: str | None, args) -> None:
    base = load_base(model, quantize=quantize, compute_dtype=torch.bfloat16)
    rng = torch.Generator().manual_seed(0)
    system = torch.randint(0, 250, (args.prompt,), generator=rng).tolist()
    prompts = [system + torch.randint(0, 250, (16,), generator=rng).tolist() for _ in range(args.requests)]
    runs = {False: [], True: []}
    for _ in range(args.rounds):
        for enable in (False, True):
            runs[enable].append(serve_round(base, prompts, args.max_tokens, enable))
    print(f"{args.requests} requests at once, a shared {args.prompt}-token system prompt + 16 tokens each, "
          f"{args.max_tokens} tokens out, max_batch 8; medians of {args.rounds} rounds")
    print(f"{'caching':8} {'wall s':>8} {'tok/s':>8} {'latency s':>10} {'p90 s':>8} {'cached':>8}")
    med = {e: {k: statistics.median(r[k] for r in runs[e]) for k in runs[e][0]} for e in runs}
    for enable in (False, True):
        m = med[enable]
        print(f"{'on' if enable else 'off':8} {m['wall']:>8.2f} {m['tok/s']:>8.1f} {m['latency']:>10.2f} "
              f"{m['latency90']:>8.2f} {int(m['cached']):>8}")
    print(f"on / off: tokens/s {med[True]['tok/s'] / med[False]['tok/s']:.2f}x, "
          f"median latency {med[True]['latency'] / med[False]['latency']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Llama checkpoint dir (default: build the 135M config)")
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", action="store_true", help="requests sharing a system prompt through the engine")
    parser.add_argument("--requests", type=int, default=32, help="--engine: requests submitted at once")
    parser.add_argument("--max-tokens", type=int, default=16, help="--engine: tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3, help="--engine: rounds of caching off, then on")
    args = parser.parse_args()
    quantize = None if args.quantize == "none" else args.quantize

    def job(path) -> None:
        if args.engine:
            run_engine(path, quantize, args)
        else:
            run(path, quantize, args.prompt, args.repeats)

    if args.model:
        job(args.model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_135m(tmp)
        job(tmp)


if __name__ == "__main__":
    main()
