"""The 4-bit (NF4) linear for decode batches: fused kernel vs dequantize + GEMM vs dense, per row count.

    python -m bench.nf4_linear [--quick] [--repeats N] [--dtype bf16|fp32|both] [--shapes 135m|1b|all] [--step]

For each weight shape (out, in) of a 135M Llama (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down)
and of a 1B one (2048x2048, 8192x2048, 2048x8192), and each M (rows of x) in 1, 2, 4, 8, 16, 32, it times,
interleaved so that they share the machine's noise, no bias:
  fused    the compiled kernel (kernels/compiled.py linear_4bit) at any M, to show the crossover
  deq+mm   the compiled dequantize into a reused (N, K) buffer of x's dtype, then F.linear
  dense    F.linear(x, W) with a dense W of x's dtype (the same shape, no quantization): the baseline
  runtime  the CPU ops' dispatch (Ops.linear_4bit): fused up to fused_4bit_max_rows(dtype), else deq+mm
and prints medians in microseconds, the ratios fused / deq+mm and runtime / dense, and for the fused
kernel the rate at which it reads the weight (packed codes + fp32 absmax per call / time, GB/s). Every
shape here stays in the L2/L3 cache between calls; a decode step over a whole model streams from DRAM.

--stream instead measures the fused bf16 kernel alone (no Python wrapper: the C function through ctypes) at
M=1 2 4 8 16 on every shape, both from DRAM (enough weights, each its own, rotated call by call that none is
in the caches: ~160 MB) as GB/s of weight read, and cache-hot (one weight) in us, with W prefetched into L2
(new) and into L1 as before (old, lut4_dp_prefetch_l2(0)), the two taking turns. Measured (EPYC Zen 4, 2
threads; a plain 2-thread read of 512 MB: 32-42 GB/s there), DRAM GB/s old -> new at M=1: 576x576 13 -> 16,
192x576 8 -> 10, 1536x576 18 -> 23.5, 576x1536 16 -> 23, 2048x2048 18 -> 26, 8192x2048 19 -> 30, 2048x8192
25 -> 30; M=2 1.0-1.3x; M=4..16 and every cache-hot time within 3% (M=8 hot: 27 / 12 / 64 / 53 / 228 / 879
/ 829 us in that order of shapes). The small shapes are bound by the call (~1 us from C, more via Python).

--step instead times the 210 linears of one 135M decode step (30 layers, each weight its own, ~53 MB: read
from DRAM, not the caches) at M=1 and M=8 through the CPU ops, in ms, and the rows/s that 8 rows gain.

Measured on an EPYC Zen 4 (2 cores, AVX512-BF16, no AMX; torch 2.13, 2 threads; a shared machine: +-30%),
us per call (fused / deq+mm / dense):
    bf16  576x576    M=1  15 / 62 / 36    M=8  35 / 67 / 45    M=16  61 / 77 / 57
    bf16  192x576    M=1  11 / 50 / 23    M=8  19 / 53 / 27    M=16  28 / 57 / 32
    bf16 1536x576    M=1  23 / 92 / 66    M=8  72 / 109 / 84   M=16 132 / 142 / 117
    bf16  576x1536   M=1  21 / 82 / 58    M=8  62 / 108 / 82   M=16 114 / 143 / 119
    fp32 1536x576    M=1  29 / 106 / 72   M=8 147 / 381 / 205  M=16 308 / 460 / 310
The fused bf16 kernel reads a cached weight at 12-24 GB/s at M=1 (fixed costs dominate the small shapes);
--step: bf16 M=1 5.0-5.9 ms (~10 GB/s with the Python dispatch; 3.7 ms, 14-16 GB/s, for the C calls alone),
M=8 9.5-10 ms, 4.2-4.7x the rows/s of M=1 (before: 9.3 ms and 21.7 ms, 3.4x); fp32 M=1 5.7 ms, M=8 18 ms
(before: 8.2 ms and 53 ms). compiled.py's FUSED_MAX_ROWS has the crossovers.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from adapterhub.runtime.kernels import compiled, ops_for
from adapterhub.runtime.quant.nf4 import NF4, NF4Weight

SHAPES = {"135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
          "1b": [(2048, 2048), (8192, 2048), (2048, 8192)]}  # (out_features N, in_features K)
ROWS = [1, 2, 4, 8, 16, 32]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each fn, the fns taking turns so that they share the noise."""
    for f in fns.values():  # warm-up: the build, first touch of buffers, the caches
        f()
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def cases(lib, ops, N: int, K: int, M: int, dtype: torch.dtype) -> dict:
    """The timed callables for one shape, row count and dtype."""
    w = torch.randn(N, K) * 0.02
    q = NF4Weight.quantize(w.to(torch.bfloat16))
    packed, absmax, code = q.packed, q.absmax_f32, NF4.values
    dense = q.dequantize(dtype)
    buffer = torch.empty(N, K, dtype=dtype)
    x = torch.randn(M, K).to(dtype)
    if dtype == torch.bfloat16:
        dequantize = lambda: lib.dequantize_4bit_bf16(packed, absmax, code, N, K, out=buffer)  # noqa: E731
    else:
        dequantize = lambda: lib.dequantize_4bit(packed, absmax, code, 64, buffer.view(-1))  # noqa: E731
    return {
        "fused": lambda: lib.linear_4bit(x, packed, absmax, code, N, K),
        "deq+mm": lambda: (dequantize(), F.linear(x, buffer)),
        "dense": lambda: F.linear(x, dense),
        "runtime": lambda: ops.linear_4bit(x, packed, absmax, NF4, 64, N, K),
    }


def decode_step(ops, M: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(ms per step, GB/s): the 210 linears of one decode step of the 135M Llama (30 layers of q, k, v, o,
    gate, up, down), each its own NF4 weight (~53 MB in all, more than the caches), through ops.linear_4bit."""
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = [(NF4Weight.quantize(torch.randn(N, K, dtype=torch.bfloat16) * 0.02), N, K) for _ in range(30)
               for N, K in layer]
    xs = {K: torch.randn(M, K).to(dtype) for K in (576, 1536)}

    def step():
        for q, N, K in weights:
            ops.linear_4bit(xs[K], q.packed, q.absmax_f32, NF4, 64, N, K)

    with torch.inference_mode():
        ms = time_interleaved({"step": step}, repeats)["step"] / 1e3
    nbytes = sum(N * K // 2 + N * K // 64 * 4 for _, N, K in weights)
    return ms, nbytes / ms / 1e6


def stream(lib, shapes, rows, repeats: int) -> None:
    """The fused bf16 kernel (VDPBF16PS), weights from DRAM vs cache-hot, prefetched into L2 vs into L1."""
    if not lib.use_dpbf16():
        raise SystemExit("--stream measures the VDPBF16PS path, which this CPU (or build) lacks")
    fn, code = lib.lib.lut4_linear, NF4.values
    print(f"{'out x in':>11} {'M':>3} {'DRAM GB/s old':>13} {'new':>6} {'hot us old':>10} {'new':>7}")
    for N, K in shapes:
        nbytes = N * K // 2 + N * K // 64 * 4  # packed codes + fp32 absmax, read once per call
        count = max(4, min(4096, 160_000_000 // nbytes))  # ~160 MB together: far more than the L3 cache
        weights = [NF4Weight.quantize(torch.randn(N, K, dtype=torch.bfloat16) * 0.02) for _ in range(count)]
        ptrs = [(q.packed.data_ptr(), q.absmax_f32.data_ptr()) for q in weights]
        for M in rows:
            x, y = torch.randn(M, K).to(torch.bfloat16), torch.empty(M, N, dtype=torch.bfloat16)
            turn = [0]

            def cold():
                w, a = ptrs[turn[0] % count]
                turn[0] += 1
                fn(x.data_ptr(), 1, M, N, K, w, a, code.data_ptr(), y.data_ptr())

            def hot():
                fn(x.data_ptr(), 1, M, N, K, *ptrs[0], code.data_ptr(), y.data_ptr())

            def mode(f, on):
                return lambda: (lib.prefetch_l2(on), f())

            us = time_interleaved({"cold old": mode(cold, False), "cold new": mode(cold, True),
                                   "hot old": mode(hot, False), "hot new": mode(hot, True)}, max(repeats, 2 * count))
            lib.prefetch_l2(True)
            print(f"{N:>5}x{K:<5} {M:>3} {nbytes / us['cold old'] / 1e3:13.1f} {nbytes / us['cold new'] / 1e3:6.1f} "
                  f"{us['hot old']:10.1f} {us['hot new']:7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default 40, --quick 5)")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--shapes", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS, help="row counts M (default 1 2 4 8 16 32)")
    parser.add_argument("--stream", action="store_true",
                        help="instead: the bf16 kernel alone, from DRAM (GB/s) and cache-hot (us), new vs old prefetch")
    parser.add_argument("--step", action="store_true",
                        help="instead: one 135M decode step's 210 linears, weights streamed from memory, M=1 vs 8")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    lib, ops = compiled.library(), ops_for("cpu")
    if lib is None:
        raise SystemExit("the compiled CPU kernels are unavailable here: nothing to compare")
    repeats = args.repeats or (5 if args.quick else 40)
    shapes = [s for name, group in SHAPES.items() if args.shapes in (name, "all") for s in group]
    dtypes = [d for name, d in DTYPES.items() if args.dtype in (name, "both")]
    limits = ", ".join(f"{str(d).removeprefix('torch.')} {n}" for d, n in ops.fused_4bit_rows.items())
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, ops {ops.name}, VDPBF16PS "
          f"{lib.use_dpbf16()}, fused up to rows: {limits}; medians in us")
    if args.stream:
        return stream(lib, shapes, [m for m in args.rows if m <= 16] if args.rows != ROWS else [1, 2, 4, 8, 16],
                      repeats)
    if args.step:
        for dtype in dtypes:
            (ms1, gbs), (ms8, _) = decode_step(ops, 1, dtype, repeats), decode_step(ops, 8, dtype, repeats)
            print(f"{str(dtype).removeprefix('torch.'):>8} 135M step, 210 linears: M=1 {ms1:.2f} ms "
                  f"({gbs:.1f} GB/s of weights), M=8 {ms8:.2f} ms: 8 rows give {8 * ms1 / ms8:.2f}x the rows/s")
        return
    print(f"{'dtype':>8} {'out x in':>11} {'M':>3} {'fused':>9} {'deq+mm':>9} {'dense':>9} {'runtime':>9}"
          f"  {'fu/dq':>6} {'rt/dense':>8} {'fused GB/s':>10}")
    for dtype in dtypes:
        for N, K in shapes:
            for M in args.rows:
                fns = cases(lib, ops, N, K, M, dtype)  # quantizing outside inference mode: its threads lack it
                with torch.inference_mode():
                    us = time_interleaved(fns, repeats)
                print(_row(dtype, N, K, M, us), flush=True)


def _row(dtype: torch.dtype, N: int, K: int, M: int, us: dict[str, float]) -> str:
    weight_bytes = N * K // 2 + N * K // 64 * 4  # packed codes + fp32 absmax, read once per call
    name = str(dtype).removeprefix("torch.")
    cells = " ".join(f"{us[k]:9.1f}" for k in ("fused", "deq+mm", "dense", "runtime"))
    return (f"{name:>8} {N:>5}x{K:<5} {M:>3} {cells}  {us['fused'] / us['deq+mm']:6.2f} "
            f"{us['runtime'] / us['dense']:8.2f} {weight_bytes / us['fused'] / 1e3:10.1f}")


if __name__ == "__main__":
    main()
