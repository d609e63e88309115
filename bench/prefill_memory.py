"""Resident memory over many prefills of varied lengths, with the GEMM row buckets on and off.

On the CPU, torch runs bf16 / fp16 matmuls through oneDNN, which compiles and caches a primitive for
every distinct shape (about 0.65 MB each, in two caches of 1024 entries): a prefill's GEMMs have B*T
rows, so prompts of varied lengths grew RSS by hundreds of MB. The runtime's Ops pad those GEMMs to a
few row counts (runtime/kernels/ops.py: gemm_rows). This bench runs, in a fresh process per mode:
a warm-up that touches every GEMM row bucket once (B = 1, T = 1..32, then one prefill per bucket up to
max_batch * max_len rows), RSS; then N prefills of random batches (1..max_batch rows of 1..max_len
random tokens, cache rows freed after each), RSS; and prints both and the growth. "off" is the runtime
with the buckets disabled (Ops.bucketed_dtypes emptied): the behaviour before the fix.

    python -m bench.prefill_memory [--n 400] [--model tiny|DIR] [--quantize nf4|fp4|none] [--dtype bf16|fp32]
                                   [--max-len 300] [--max-batch 3] [--adapters 0] [--modes off,on]

--model real builds a SmolLM-135M-sized random checkpoint (hidden 576, 30 layers, vocab 49152) in a
temporary directory first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
import tempfile
import time

import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime import kernels, load_base
from adapterhub.runtime.kernels.ops import GEMM_EXACT_ROWS, gemm_rows
from adapterhub.runtime.model.tiny import TINY_CONFIG, random_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
REAL_CONFIG = dataclasses.replace(
    TINY_CONFIG, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=(2,), pad_token_id=None)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def warmup_shapes(max_batch: int, max_len: int) -> list[tuple[int, int]]:
    """(B, T) prefills that reach every GEMM row count a bucketed prefill of up to max_batch x max_len runs:
    T = 1..GEMM_EXACT_ROWS for one row, then one (B, T) per bucket with gemm_rows(B * T) == that bucket."""
    shapes = [(1, t) for t in range(1, min(GEMM_EXACT_ROWS, max_len) + 1)]
    for bucket in sorted({gemm_rows(m) for m in range(GEMM_EXACT_ROWS + 1, max_batch * max_len + 1)}):
        B = -(-min(bucket, max_batch * max_len) // max_len)
        T = min(bucket, max_batch * max_len) // B
        if gemm_rows(B * T) == bucket:
            shapes.append((B, T))
    return shapes


def measure(args) -> dict:
    """One mode in this process: warm-up, RSS, args.n random prefills, RSS."""
    base = load_base(args.model, quantize=None if args.quantize == "none" else args.quantize,
                     compute_dtype=DTYPES[args.dtype])
    ops = kernels.ops_for(base.model.device)
    if args.mode == "off":
        ops.bucketed_dtypes = frozenset()
    names = [base.add_adapter(random_adapter(base.module_shapes(), r=16, target_modules="all-linear", seed=i), f"a{i}")
             for i in range(args.adapters)]
    V, rng = base.config.vocab_size, random.Random(0)
    cache = base.new_cache(args.max_batch, args.max_len)

    def prefill(B: int, lengths: list[int]) -> None:
        prompts = [[rng.randrange(V) for _ in range(n)] for n in lengths]
        ids = base.pool.acquire([rng.choice([*names, None]) for _ in range(B)]) if names else None
        base.prefill(cache, list(range(B)), prompts, ids)
        if ids is not None:
            base.pool.release(ids)
        cache.free(list(range(B)))

    start = rss_mb()
    t0 = time.perf_counter()
    shapes = warmup_shapes(args.max_batch, args.max_len)
    for B, T in shapes:
        prefill(B, [T] * B)
    warm = rss_mb()
    t1 = time.perf_counter()
    for _ in range(args.n):
        B = rng.randint(1, args.max_batch)
        prefill(B, [rng.randint(1, args.max_len) for _ in range(B)])
    end = rss_mb()
    return dict(mode=args.mode, ops=repr(ops), start=start, warm=warm, end=end, warmup_prefills=len(shapes),
                warmup_s=t1 - t0, n=args.n, s=time.perf_counter() - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="random prefills after the warm-up")
    parser.add_argument("--model", default="tiny", help="tiny, a checkpoint dir, or 'real' (SmolLM-135M-sized, random)")
    parser.add_argument("--quantize", default="nf4", help="nf4 | fp4 | none")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--max-batch", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=0, help="random r=16 all-linear adapters rows pick from")
    parser.add_argument("--modes", default="off,on", help="off: GEMM row buckets disabled (before the fix); on")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # the child process's one mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "real":
            args.model = str(random_checkpoint(f"{tmp}/real", REAL_CONFIG, seed=1, dtype=torch.bfloat16))
        print(f"model={args.model} quantize={args.quantize} dtype={args.dtype} threads={torch.get_num_threads()} "
              f"prefills: warm-up over every row bucket, then n={args.n} random (B 1..{args.max_batch}, "
              f"T 1..{args.max_len}), adapters={args.adapters}")
        print(f"{'mode':5} {'ops':14} {'start MB':>9} {'warm MB':>8} {'end MB':>8} {'growth':>16} {'prefill/s':>10}")
        for mode in args.modes.split(","):
            argv = [sys.executable, "-m", "bench.prefill_memory", *sys.argv[1:], "--model", args.model, "--mode", mode]
            r = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            growth = r["end"] - r["warm"]
            print(f"{mode:5} {r['ops']:14} {r['start']:9.0f} {r['warm']:8.0f} {r['end']:8.0f} "
                  f"{growth:+7.0f} MB {100 * growth / r['warm']:+5.1f}% {r['n'] / r['s']:10.1f}")


if __name__ == "__main__":
    main()
