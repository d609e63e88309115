"""Decode tokens/s of the 135M Llama config (bench/serve.py's `build_135m`: SmolLM2-135M's shapes, random weights):
the fused CPU decode step (kernels/decode.py) against the same model on its torch layers, in one process.

B = 1 and B = 8 distinct rows (prompts of 16 + b tokens), base only and with a different LoRA (r = 16, all
linears) per row; NF4 and dense bf16 weights. Each figure is the median over --rounds of --steps greedy decode
steps after the prefill; the fused and the torch path alternate round by round, so a shared machine slows both.

    python -m bench.decode_step [--steps 32] [--rounds 5] [--quantize nf4,none]

One run (AMD EPYC Zen 4, 2 cores, other processes on the machine; --rounds 3 --steps 24), tokens/s fused / torch:
NF4 1 row 74.3 / 45.1, 8 rows 211.6 / 158.7, 1 row + LoRA 44.1 / 32.5, 8 rows + 8 LoRAs 105.3 / 15.7 (that torch
figure is an outlier of the shared machine: 90-135 in other runs); bf16 33.1 / 23.1, 164.4 / 117.8, 19.6 / 15.4,
118.2 / 101.1. The 4-bit linears take ~11 of the ~14 ms of an NF4 1-row step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime import load_base
from bench.serve import build_135m

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decode_seconds(base, B: int, ids, steps: int) -> float:
    """Seconds per step of `steps` greedy decode steps of B rows after their prefill (a fresh cache)."""
    cache = base.new_cache(max_batch=B, max_seq=512)
    rows = torch.arange(B)
    prompts = [[(7 * b + j) % 250 for j in range(16 + b)] for b in range(B)]
    tokens = base.prefill(cache, rows.tolist(), prompts, ids).argmax(-1)
    tokens = base.decode(cache, rows, tokens, ids).argmax(-1)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        tokens = base.decode(cache, rows, tokens, ids).argmax(-1)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quantize", default="nf4,none", help="comma-separated weight formats; none: dense bf16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_135m(tmp)
        print(f"{'weights':8} {'rows':>4} {'adapters':>9} {'fused tok/s':>12} {'torch tok/s':>12} {'ratio':>6}")
        for fmt in args.quantize.split(","):
            base = load_base(tmp, quantize=None if fmt == "none" else fmt)
            fused = base.model.decode_kernels
            names = [base.add_adapter(random_adapter(base.module_shapes(), r=16, lora_alpha=32, target_modules=TARGETS,
                                                     seed=i), f"lora{i}") for i in range(8)]
            for B, adapters in ((1, None), (8, None), (1, names[:1]), (8, names)):
                ids = None if adapters is None else base.pool.acquire(adapters)
                times = {"fused": [], "torch": []}
                for _ in range(args.rounds):
                    for path, kernels in (("fused", fused), ("torch", None)):
                        base.model.use_decode_kernels(kernels)
                        times[path].append(decode_seconds(base, B, ids, args.steps))
                base.model.use_decode_kernels(fused)
                if ids is not None:
                    base.pool.release(ids)
                rate = {path: B / statistics.median(t) for path, t in times.items()}
                label = "-" if adapters is None else str(len(adapters))
                print(f"{fmt:8} {B:>4} {label:>9} {rate['fused']:>12.1f} {rate['torch']:>12.1f} "
                      f"{rate['fused'] / rate['torch']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
