"""Time to prefill a prompt whose start is in the prefix cache, against the same prompt with caching off.

A row of `--prompt` tokens shares all of its full blocks but the last with an earlier request's prompt (random
tokens, the base), as a shared system prompt would; `base.prefill` of that row is timed (median of `--repeats`,
the row freed between calls) with `prefix_adapters` (the cached blocks shared, the last block computed) and
without (every token computed). Also the cost of the keys alone (`block_keys`), which every prefill with
caching on pays.

    python -m bench.prefix_cache [--model DIR] [--quantize nf4|none] [--prompt 1024] [--repeats 5]

Without --model it builds bench/serve.py's 135M config (random weights, bf16) in a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from adapterhub.runtime import load_base
from adapterhub.runtime.model.kv_cache import BLOCK_SIZE
from adapterhub.runtime.model.prefix_cache import block_keys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Llama checkpoint dir (default: build the 135M config)")
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    if args.model:
        run(args.model, quantize, args.prompt, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_135m(tmp)
        run(tmp, quantize, args.prompt, args.repeats)


if __name__ == "__main__":
    main()
