"""NF4 linear vs dense bf16 (and bitsandbytes' CPU kernel when installed), bf16, no bias.

    python -m bench.nf4_linear [--quick] [--repeats N]

For each weight shape (out, in) = 4096x4096 and 11008x4096 and each M (rows of x: 1 = decode, 32 = a
decode batch, 2048 = prefill) it times, interleaved so that they share the machine's noise:
  dense      F.linear(x, W) with a dense bf16 W: the baseline
  runtime    the runtime's NF4 linear: AdapterLinear (NF4 weight, ids=None) -> its device's Ops.linear_4bit,
             which takes the fused CPU kernel for M <= fused_4bit_max_rows, else dequantizes into a
             scratch buffer + F.linear
  fused      the compiled kernel (kernels/compiled.py linear_4bit) for M <= 32, to show the crossover
  bnb        bitsandbytes Linear4bit (nf4, double quant, bf16 compute, eval, no grad), repacked for its
             CPU kernel by a warm-up forward
and prints medians in ms with ratios vs dense and vs bnb. Goals: runtime <= 1.25x bnb at M=1,
runtime <= 1.1x dense at M=2048.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.kernels import compiled, ops_for

SHAPES = [(4096, 4096), (11008, 4096)]  # (out_features, in_features)
ROWS = [1, 32, 2048]


def runtime_linear(w: torch.Tensor) -> AdapterLinear:
    """The runtime's NF4 layer for weight w (N, K) bf16 (called with ids=None)."""
    return AdapterLinear.from_dense(w, dtype=torch.bfloat16, quantize="nf4")


def bnb_linear(w: torch.Tensor):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu").eval()  # quantizes on the move to a device
    return layer


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():  # warm-up: builds, repacks (bnb), first-touch of scratch buffers
        f()
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def repeats_for(M: int, quick: bool, repeats: int | None) -> int:
    if repeats:
        return repeats
    return (3 if M >= 2048 else 10) if quick else (7 if M >= 2048 else 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default 50, 7 at M=2048)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    lib, ops = compiled.library(), ops_for("cpu")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, ops {ops.name}, "
          f"fused_4bit_max_rows={ops.fused_4bit_max_rows}; medians in ms")
    header = f"{'out x in':>11} {'M':>5} {'dense':>8} {'runtime':>8} {'fused':>8} {'bnb':>8}  {'rt/dense':>8} {'rt/bnb':>7}"
    print(header)
    for N, K in SHAPES:
        w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
        layer = runtime_linear(w)
        packed, absmax = layer.weight.packed, layer.weight.absmax_f32
        bnb = bnb_linear(w)
        for M in ROWS:
            x = torch.randn(1, M, K, dtype=torch.bfloat16)
            fns = {"dense": lambda: F.linear(x, w)}
            fns["runtime"] = lambda: layer(x, None)
            if lib is not None and M <= 32:
                fns["fused"] = lambda: lib.linear_4bit(x, packed, absmax, layer.weight.codebook.values, N, K)
            if bnb is not None:
                fns["bnb"] = lambda: bnb(x)
            with torch.inference_mode():
                ms = time_interleaved(fns, repeats_for(M, args.quick, args.repeats))
            print(_row(N, K, M, ms), flush=True)


def _row(N: int, K: int, M: int, ms: dict[str, float]) -> str:
    cell = lambda name: f"{ms[name]:8.3f}" if name in ms else f"{'-':>8}"  # noqa: E731
    main_ms = ms.get("runtime")
    vs_dense = f"{main_ms / ms['dense']:8.2f}" if main_ms else f"{'-':>8}"
    vs_bnb = f"{main_ms / ms['bnb']:7.2f}" if main_ms and "bnb" in ms else f"{'-':>7}"
    return f"{N:>5}x{K:<5} {M:>5} {cell('dense')} {cell('runtime')} {cell('fused')} {cell('bnb')}  {vs_dense} {vs_bnb}"


if __name__ == "__main__":
    main()
