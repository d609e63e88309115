"""NF4 linear vs dense bf16 (and bitsandbytes' CPU kernel when installed), bf16, no bias.

    python -m bench.nf4_linear [--quick] [--repeats N]

For each weight shape (out, in) = 4096x4096 and 11008x4096 and each M (rows of x: 1 = decode, 32 = a
decode batch, 2048 = prefill) it times, interleaved so that they share the machine's noise:
  dense      F.linear(x, W) with a dense bf16 W: the baseline
  runtime    the runtime's NF4 linear: AdapterLinear (NF4 weight, ids=None) -> kernels.nf4_linear, which
             takes the fused CPU kernel for M <= cpu_kernels.FUSED_MAX_ROWS, else dequantize into a
             scratch buffer + F.linear (if the layer cannot be built, the same dispatch spelled out)
  fused      cpu_kernels.nf4_linear (compiled kernel) for M <= 32, to show the crossover
  bnb        bitsandbytes Linear4bit (nf4, double quant, bf16 compute, eval, no grad), repacked for its
             CPU kernel by a warm-up forward
and prints medians in ms with ratios vs dense and vs bnb. Goals (issue 4): runtime <= 1.25x bnb at
M=1, runtime <= 1.1x dense at M=2048.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from adapterhub.runtime import cpu_kernels

SHAPES = [(4096, 4096), (11008, 4096)]  # (out_features, in_features)
ROWS = [1, 32, 2048]


def runtime_linear(w: torch.Tensor):
    """The runtime's NF4 layer for weight w (N, K) bf16, called with ids=None; None if unavailable."""
    try:
        from adapterhub.runtime.linear import AdapterLinear

        layer = AdapterLinear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        layer.load_nf4(w)
    except Exception as exc:  # the runtime's NF4 layer is optional here: report, then bench the kernel alone
        print(f"# AdapterLinear.load_nf4 failed ({type(exc).__name__}: {exc}); 'runtime' = its dispatch, spelled out")
        return None, None
    return (lambda x: layer(x, None)), (layer.nf4_packed, layer.nf4_absmax)


def dispatch_linear(packed: torch.Tensor, absmax: torch.Tensor, N: int, K: int):
    """What kernels.nf4_linear does on the CPU: fused for few rows, else dequantize + one GEMM."""
    scratch = torch.empty(N, K, dtype=torch.bfloat16)

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // K <= cpu_kernels.FUSED_MAX_ROWS:
            return cpu_kernels.nf4_linear(x, packed, absmax, N, K)
        return F.linear(x, cpu_kernels.nf4_dequantize(packed, absmax, N, K, out=scratch))

    return linear


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


def random_packed(N: int, K: int):
    """Any NF4 bytes time the same; used when the runtime cannot quantize (runtime.nf4 missing)."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
    return packed, torch.rand(N * K // 64, generator=g) * 0.05


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
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_kernels.available()="
          f"{cpu_kernels.available()}, FUSED_MAX_ROWS={cpu_kernels.FUSED_MAX_ROWS}; medians in ms")
    header = f"{'out x in':>11} {'M':>5} {'dense':>8} {'runtime':>8} {'fused':>8} {'bnb':>8}  {'rt/dense':>8} {'rt/bnb':>7}"
    print(header)
    for N, K in SHAPES:
        # Layers are built outside inference mode (they update their buffers in place), run inside it.
        w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
        runtime, nf4_tensors = runtime_linear(w)
        packed, absmax = nf4_tensors if nf4_tensors else random_packed(N, K)
        if runtime is None and cpu_kernels.available():
            runtime = dispatch_linear(packed, absmax, N, K)
        bnb = bnb_linear(w)
        for M in ROWS:
            x = torch.randn(1, M, K, dtype=torch.bfloat16)
            fns = {"dense": lambda: F.linear(x, w)}
            if runtime is not None:
                fns["runtime"] = lambda: runtime(x)
            if cpu_kernels.available() and M <= 32:
                fns["fused"] = lambda: cpu_kernels.nf4_linear(x, packed, absmax, N, K)
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
