"""CUDA op benchmarks: time, achieved bandwidth against the device peak, speed-up against the torch path.

    python -m cuda.bench [--quick]        # from the repository root, on a machine with a CUDA GPU
    python cuda/bench.py [--quick]        # the same, if another package named `cuda` shadows this one

Sections (bf16, Llama-2-7B shapes: D = 4096, F = 11008, NF4 block 64):
1. nf4_dequantize into bf16, against the torch Ops (runtime/kernels/ops.py) on the same GPU.
2. NF4 linear at M = 1 (the fused GEMV) against dense bf16 F.linear (target: >= 3.5x), the torch path
   (dequantize + F.linear) and bitsandbytes' 4-bit GEMV where installed; then a row sweep, GEMV against
   dequantize + GEMM, to place kGemvMaxRows in cuda/csrc/ops.cpp.
3. lora_shrink / lora_expand at decode: 32 rows, 32 distinct r = 16 adapters (+ slot 0), DoRA scale on.
4. Batched-LoRA decode overhead: the 7 projections of one Llama-2-7B layer at 32 decode rows, NF4 base,
   with and without 32 distinct r = 16 adapters (target: <= 10 %). The attention, norms and the rest
   of a real decode step are not counted, so this overhead is an upper bound for the whole step.

Timing: each op is captured several times in a CUDA graph (no Python or launch overhead, as a decode
loop replayed from a graph), the replays are timed with CUDA events, and the median per call is
reported; a step that cannot be captured (a host sync) is timed eagerly and says so.
Successive calls read different copies of the weights, enough to exceed the L2 cache several times,
so every call streams its weights from HBM as a real decode step does. Bandwidth = bytes the op must
move at least (inputs read once, outputs written once) / time.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from adapterhub.runtime.kernels import Ops
from adapterhub.runtime.kernels import cuda as cuda_ops
from adapterhub.runtime.quant.nf4 import NF4

D, FF, G, R, ROWS, SLOTS = 4096, 11008, 64, 16, 32, 33
BF16 = torch.bfloat16
# Vendor datasheet peaks: HBM GB/s and dense bf16 TFLOP/s, by device-name substring.
PEAKS = {
    "H100 80GB HBM3": (3350, 989), "H100 SXM": (3350, 989), "H100 NVL": (3900, 835), "H100 PCIe": (2000, 756),
    "H200": (4800, 989), "A100-SXM4-80GB": (2039, 312), "A100 80GB PCIe": (1935, 312), "A100": (1555, 312),
}
LAYER = {  # Llama-2-7B decoder projections: (Dout, Din)
    "q_proj": (D, D), "k_proj": (D, D), "v_proj": (D, D), "o_proj": (D, D),
    "gate_proj": (FF, D), "up_proj": (FF, D), "down_proj": (D, FF),
}


def device_peaks() -> tuple[float | None, float | None]:
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None, None


def copies_for(bytes_per_copy: int) -> int:
    """Weight copies per timed sequence: together at least 4x the L2 cache, so each call reads HBM."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, math.ceil(4 * l2 / bytes_per_copy))


def median_us(step, calls: int, repeats: int, capture: bool = True) -> float:
    """Median microseconds per call of step(i), i = 0..calls-1, captured once in a CUDA graph; eager
    (events around the same sequence, launch overhead included) with capture=False or when the
    capture fails."""

    def sequence():
        for i in range(calls):
            step(i)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sequence()  # warm-up: allocator pools, lazy initialisation
    torch.cuda.current_stream().wait_stream(side)
    timed = sequence
    if capture:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                sequence()
            timed = graph.replay
        except RuntimeError as error:  # e.g. a host sync inside the step
            print(f"  (not capturable, timed eagerly: {str(error).splitlines()[0][:80]})")
            torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        timed()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


_TORCH: dict[str, Ops] = {}


def torch_ops() -> Ops:
    """The torch twin of the CUDA ops on the GPU (kernels/ops.py), built once before any graph capture."""
    if "ops" not in _TORCH:
        _TORCH["ops"] = Ops(torch.device("cuda", torch.cuda.current_device()))
    return _TORCH["ops"]


def torch_dequantize(packed, absmax, out):
    """Ops.dequantize_4bit, the torch formulation, on the GPU."""
    return torch_ops().dequantize_4bit(packed, absmax, NF4, G, out)


def nf4_weights(Dout: int, Din: int, copies: int):
    """`copies` random NF4 weights (packed, absmax) on the GPU."""
    return [(torch.randint(0, 256, (Dout * Din // 2,), dtype=torch.uint8, device="cuda"),
             torch.rand(Dout * Din // G, device="cuda") * 0.08 + 0.01) for _ in range(copies)]


def nf4_bytes(Dout: int, Din: int) -> int:
    return Dout * Din // 2 + Dout * Din // G * 4


def row(name, us, moved_bytes=None, peak_gbs=None, baseline_us=None, baseline="") -> None:
    gbs = f"{moved_bytes / us / 1e3:8.0f}" if moved_bytes else " " * 8
    share = f"{100 * moved_bytes / us / 1e3 / peak_gbs:5.0f}%" if moved_bytes and peak_gbs else " " * 6
    versus = f"{baseline_us / us:6.2f}x vs {baseline} ({baseline_us:.1f} us)" if baseline_us else ""
    print(f"{name:<44} {us:9.1f} us {gbs} GB/s {share}  {versus}")


def bench_dequantize(shapes, repeats, peak_gbs) -> None:
    print("\n== nf4_dequantize -> bf16 ==")
    for Dout, Din in shapes:
        weights = nf4_weights(Dout, Din, copies_for(nf4_bytes(Dout, Din) + 2 * Dout * Din))
        outs = [torch.empty(Dout, Din, dtype=BF16, device="cuda") for _ in weights]
        calls = len(weights)

        def op(i):
            cuda_ops.nf4_dequantize(*weights[i], G, outs[i])

        def twin(i):
            torch_dequantize(*weights[i], outs[i])

        us = median_us(op, calls, repeats)
        base = median_us(twin, calls, repeats)
        row(f"nf4_dequantize {Dout}x{Din}", us, nf4_bytes(Dout, Din) + 2 * Dout * Din, peak_gbs, base, "torch path")


def bench_gemv(shapes, repeats, peak_gbs, sweep) -> None:
    print("\n== NF4 linear at M = 1 (fused GEMV) ==")
    for Dout, Din in shapes:
        weights = nf4_weights(Dout, Din, copies_for(nf4_bytes(Dout, Din)))
        dense = [torch.randn(Dout, Din, dtype=BF16, device="cuda") for _ in range(copies_for(2 * Dout * Din))]
        x = torch.randn(1, 1, Din, dtype=BF16, device="cuda")
        us = median_us(lambda i: cuda_ops.nf4_linear(x, *weights[i], G, Dout, Din), len(weights), repeats)
        dense_us = median_us(lambda i: F.linear(x, dense[i]), len(dense), repeats)
        scratch = torch.empty(Dout, Din, dtype=BF16, device="cuda")
        twin_us = median_us(lambda i: F.linear(x, torch_dequantize(*weights[i], scratch)), len(weights), repeats)
        name = f"nf4 GEMV M=1 {Dout}x{Din}"
        row(name, us, nf4_bytes(Dout, Din), peak_gbs, dense_us, "dense bf16 F.linear")
        row("", us, None, None, twin_us, "torch path (dequantize + F.linear)")
        bnb_us = bitsandbytes_gemv_us(Dout, Din, x, repeats)
        if bnb_us is not None:
            row("", us, None, None, bnb_us, "bitsandbytes 4-bit GEMV")
    if sweep:
        print("\n== nf4_linear row sweep, 4096x4096: fused GEMV vs dequantize + GEMM ==")
        weights = nf4_weights(D, D, copies_for(nf4_bytes(D, D)))
        for rows in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(rows, 1, D, dtype=BF16, device="cuda")
            gemv = median_us(lambda i: cuda_ops.nf4_gemv(x, *weights[i], G, D), len(weights), repeats)

            def dequant_gemm(i):
                w = torch.empty(D, D, dtype=BF16, device="cuda")
                return F.linear(x, cuda_ops.nf4_dequantize(*weights[i], G, w))

            row(f"nf4_gemv rows={rows}", gemv, None, None, median_us(dequant_gemm, len(weights), repeats),
                "dequantize + GEMM")


def bitsandbytes_gemv_us(Dout, Din, x, repeats) -> float | None:
    """bitsandbytes' matmul_4bit at one row (its GEMV), NF4 block 64 without double quant (the same
    bytes as ours), where bitsandbytes is installed; None otherwise or when it fails (printed)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    try:
        states = [bnbf.quantize_4bit(torch.randn(Dout, Din, dtype=BF16, device="cuda") * 0.02, blocksize=G,
                                     compress_statistics=False, quant_type="nf4")
                  for _ in range(copies_for(nf4_bytes(Dout, Din)))]
        return median_us(lambda i: bitsandbytes.matmul_4bit(x, states[i][0], states[i][1]), len(states), repeats)
    except Exception as error:  # an optional comparison must not end the run
        print(f"  (bitsandbytes comparison failed: {error})")
        return None


def lora_stacks(Din: int, Dout: int, copies: int):
    """`copies` sets of (A (N, R, Din), B (N, R, Dout), scaling (N,), dora_scale (N, Dout)); slot 0 empty."""
    sets = []
    for _ in range(copies):
        A = torch.randn(SLOTS, R, Din, dtype=BF16, device="cuda") / Din**0.5
        B = torch.randn(SLOTS, R, Dout, dtype=BF16, device="cuda") / R**0.5
        A[0], B[0] = 0, 0
        # dora_scale near 1: a timed sequence applies the in-place op to the same y hundreds of times.
        sets.append((A, B, torch.rand(SLOTS, device="cuda"), torch.rand(SLOTS, Dout, device="cuda") * 0.02 + 0.99))
    return sets


def lora_bytes(Din: int, Dout: int, adapters: int) -> tuple[int, int]:
    """Least bytes moved by shrink and by expand at decode (ROWS rows, `adapters` distinct slots)."""
    shrink = adapters * R * Din * 2 + ROWS * Din * 2 + ROWS * R * 2
    expand = adapters * R * Dout * 2 + 2 * ROWS * Dout * 2 + ROWS * R * 2 + adapters * Dout * 4
    return shrink, expand


def bench_lora(repeats, peak_gbs) -> None:
    print(f"\n== batched LoRA at decode: {ROWS} rows, {ROWS} distinct r={R} adapters, DoRA scale on ==")
    ids = torch.arange(1, ROWS + 1, device="cuda")  # every row its own adapter
    stacks = lora_stacks(D, D, copies_for(4 * SLOTS * R * D))
    x = torch.randn(ROWS, 1, D, dtype=BF16, device="cuda")
    y = torch.randn(ROWS, 1, D, dtype=BF16, device="cuda")
    h = torch.randn(ROWS, 1, R, dtype=BF16, device="cuda")
    shrink_bytes, expand_bytes = lora_bytes(D, D, ROWS)
    for name, op, twin, moved in (
        ("lora_shrink", lambda i: cuda_ops.lora_shrink(x, stacks[i][0], ids),
         lambda i: torch_ops().lora_shrink(x, stacks[i][0], ids), shrink_bytes),
        ("lora_expand", lambda i: cuda_ops.lora_expand(y, h, stacks[i][1], ids, *stacks[i][2:]),
         lambda i: torch_ops().lora_expand(y, h, stacks[i][1], ids, *stacks[i][2:]), expand_bytes),
    ):
        us = median_us(op, len(stacks), repeats)
        base = median_us(twin, len(stacks), repeats, capture=False)  # eager: the torch ops read ids on the host
        row(f"{name} {D}->{R}" if name == "lora_shrink" else f"{name} {R}->{D}", us, moved, peak_gbs, base,
            "torch path, eager")


def bench_decode_overhead(repeats, targets_sets) -> None:
    print(f"\n== decode overhead: one Llama-2-7B layer, {ROWS} rows, NF4 base, {ROWS} distinct r={R} adapters ==")
    ids = torch.arange(1, ROWS + 1, device="cuda")
    layers = max(2, copies_for(sum(nf4_bytes(o, i) for o, i in LAYER.values())))
    weights = {name: nf4_weights(o, i, layers) for name, (o, i) in LAYER.items()}
    stacks = {name: lora_stacks(i, o, layers) for name, (o, i) in LAYER.items()}
    xs = {Din: torch.randn(ROWS, 1, Din, dtype=BF16, device="cuda") for Din in (D, FF)}

    def layer_step(i, targets):
        for name, (Dout, Din) in LAYER.items():
            y = cuda_ops.nf4_linear(xs[Din], *weights[name][i], G, Dout, Din)
            if name in targets:
                A, B, scaling, dora = stacks[name][i]
                cuda_ops.lora_expand(y, cuda_ops.lora_shrink(xs[Din], A, ids), B, ids, scaling, dora)

    base = median_us(lambda i: layer_step(i, ()), layers, repeats)
    row("base: 7 NF4 projections", base)
    for label, targets in targets_sets.items():
        us = median_us(lambda i: layer_step(i, targets), layers, repeats)
        print(f"{'+ LoRA/DoRA on ' + label:<44} {us:9.1f} us   overhead {100 * (us - base) / base:5.1f} % "
              "(target <= 10 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 4096x4096 only, no row sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda/bench.py needs a CUDA device")
    if not cuda_ops.available():
        raise SystemExit("the adapterhub CUDA ops did not build; see the warning above")
    peak_gbs, peak_tflops = device_peaks()
    print(f"device: {torch.cuda.get_device_name()}; datasheet peak: {peak_gbs or '?'} GB/s, "
          f"{peak_tflops or '?'} bf16 TFLOP/s; torch {torch.__version__}")
    repeats = 5 if args.quick else 20
    shapes = [(D, D)] if args.quick else [(D, D), (FF, D)]
    bench_dequantize(shapes, repeats, peak_gbs)
    bench_gemv(shapes, repeats, peak_gbs, sweep=not args.quick)
    bench_lora(repeats, peak_gbs)
    bench_decode_overhead(repeats, {"all 7 projections": tuple(LAYER), "q_proj, v_proj": ("q_proj", "v_proj")})


if __name__ == "__main__":
    main()
