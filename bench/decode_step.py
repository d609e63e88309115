"""Milliseconds per decode step of a Llama (default: bench/serve.py's `build_135m`, SmolLM2-135M's shapes, random
weights) on three paths in one process: every decoder layer in one compiled call (model/decode_stack.py), the
per-op fused step (kernels/decode.py, a Python call per op and projection) and the torch layers.

B = 1 and B = 8 distinct rows (prompts of 16 + b tokens), base only and with a different LoRA per row (r = 16, all
linears: random, or the PEFT dirs `adapters/a0..a7` beside --model when it has them); NF4 and dense bf16 weights
(dense bf16 keeps the per-op step: model/decode_stack.py says why). Each figure is the median over --rounds of
--steps greedy decode steps after the prefill; the paths alternate round by round, so a shared machine slows all.

    python -m bench.decode_step [--model DIR] [--steps 32] [--rounds 5] [--quantize nf4,none] [--paths stack,per-op]
    python -m bench.decode_step --parts [--model DIR]    # where a one-call NF4 step's time goes

One run (AMD EPYC Zen 4, 2 cores, quiet; the 135M checkpoint of bench/decode.py with its eight r=16 PEFT
adapters, --quantize nf4 --rounds 5, 1.6 minutes), ms per step, one call / per-op / torch: NF4 1 row 5.78 / 9.45 /
16.61, 1 row + LoRA 7.36 / 14.66 / 22.10, 8 rows 19.06 / 22.86 / 30.33, 8 rows + 8 LoRAs 24.40 / 31.40 / 39.65.
The 1B config: 1 row ~40 ms (bench/decode.py: 24.9 tokens/s), its bf16 lm_head over the tied 128256 x 2048
embedding reading 525 MB a step. What remains of a 135M 1-row step: the layers' call ~3.5 ms (the 4-bit linears),
the bf16 lm_head GEMV over the tied 49152 x 576 embedding ~1.9 ms, Python ~0.5 ms. Eight distinct r=16 adapters
are ~80 MB of bf16 stacks a step reads besides the ~60 MB of NF4 layers (~2.5 ms at the 31 GB/s two cores
stream): most of the 8-row LoRA cost is those bytes.
--parts after the head GEMV's tiles (same machine): ms per step / in the layers' call / in the head: 1 row 6.7 /
4.1 / 2.1, 1 row + LoRA 7.8 / 4.7 / 2.4, 8 rows 17.6 / 13.4 / 2.9, 8 rows + 8 LoRAs 23.6 / 19.4 / 2.9 (the head
at 8 rows was 5.1-5.4 ms before).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime import load_base
from bench.serve import build_135m

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = ("stack", "per-op", "torch")


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


class Parts:
    """Wall time inside the layers' one call (DecodeStack.run) and inside the model's head (final norm + lm_head),
    accumulated while installed: the rest of a step is Python, the embedding and the argmax."""

    def __init__(self, base):
        self.base, self.stack, self.head, self.steps = base, 0.0, 0.0, 0

    def __enter__(self):
        model = self.base.model
        run, head = model.decode_stack.run, model.head

        def timed_run(*args, **kwargs):
            start = time.perf_counter()
            out = run(*args, **kwargs)
            self.stack += time.perf_counter() - start
            self.steps += 1
            return out

        def timed_head(*args, **kwargs):
            start = time.perf_counter()
            out = head(*args, **kwargs)
            self.head += time.perf_counter() - start
            return out

        model.decode_stack.run, model.head = timed_run, timed_head
        return self

    def __exit__(self, *exc):
        del self.base.model.decode_stack.run, self.base.model.head  # the class's methods again


def parts(model: Path, args) -> None:
    """--parts: ms per step of the layers' call and of the head, one-call path, NF4, 1 and 8 rows."""
    base = load_base(model, quantize="nf4")
    names = adapters(base, model)
    print(f"{'rows':>4} {'adapters':>9} {'step ms':>8} {'layers ms':>10} {'head ms':>8}", flush=True)
    for B, chosen in ((1, None), (1, names[:1]), (8, None), (8, names)):
        ids = None if chosen is None else base.pool.acquire(chosen)
        rounds = []
        for _ in range(args.rounds):
            with Parts(base) as p:
                step = decode_seconds(base, B, ids, args.steps)
            rounds.append((step, p.stack / p.steps, p.head / p.steps))
        if ids is not None:
            base.pool.release(ids)
        step, stack, head = (1000 * statistics.median(r[i] for r in rounds) for i in range(3))
        print(f"{B:>4} {'-' if chosen is None else len(chosen):>9} {step:>8.2f} {stack:>10.2f} {head:>8.2f}", flush=True)


def use_path(base, kernels, path: str) -> None:
    base.model.use_decode_kernels(None if path == "torch" else kernels, whole_step=path == "stack")


def adapters(base, model: Path) -> list[str]:
    """Eight adapters: the PEFT dirs beside the model when there are, else random r=16 ones on every linear."""
    dirs = [model / "adapters" / f"a{i}" for i in range(8)]
    if all(d.is_dir() for d in dirs):
        return [base.add_adapter(d, name=f"lora{i}") for i, d in enumerate(dirs)]
    return [base.add_adapter(random_adapter(base.module_shapes(), r=16, lora_alpha=32, target_modules=TARGETS,
                                            seed=i), f"lora{i}") for i in range(8)]


def run(model: Path, args) -> None:
    paths = args.paths.split(",")
    print(f"{'weights':8} {'rows':>4} {'adapters':>9} " + " ".join(f"{p + ' ms':>10}" for p in paths), flush=True)
    for fmt in args.quantize.split(","):
        base = load_base(model, quantize=None if fmt == "none" else fmt)
        fused = base.model.decode_kernels
        names = adapters(base, model)
        for B, chosen in ((1, None), (1, names[:1]), (8, None), (8, names)):
            ids = None if chosen is None else base.pool.acquire(chosen)
            times = {path: [] for path in paths}
            for _ in range(args.rounds):
                for path in paths:
                    use_path(base, fused, path)
                    times[path].append(decode_seconds(base, B, ids, args.steps))
            use_path(base, fused, "stack")
            if ids is not None:
                base.pool.release(ids)
            label = "-" if chosen is None else str(len(chosen))
            cells = " ".join(f"{1000 * statistics.median(times[p]):>10.2f}" for p in paths)
            print(f"{fmt:8} {B:>4} {label:>9} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Llama checkpoint dir (default: build the 135M config)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quantize", default="nf4,none", help="comma-separated weight formats; none: dense bf16")
    parser.add_argument("--paths", default="stack,per-op,torch", help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--parts", action="store_true", help="time the layers' call and the head within the step")
    args = parser.parse_args()
    job = parts if args.parts else run
    if args.model is not None:
        job(args.model, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_135m(tmp)
        job(Path(tmp), args)


if __name__ == "__main__":
    main()
