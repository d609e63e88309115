"""NF4 quantize / dequantize throughput: adapterhub (compiled CPU kernels, torch fallback) vs bitsandbytes, vs bandwidth.

Weights: bf16 (4096, 4096) and (11008, 4096), blocksize 64, double quantization (the QLoRA setting).
- quantize: Mparam/s of `adapterhub.nf4.quantize(w)` and of bitsandbytes `quantize_4bit(w, nf4,
  compress_statistics=True)` when installed, and their ratio (the issue asks for >= 5x).
- dequantize into a preallocated bf16 buffer with the float32 absmax decoded once (what the runtime's
  NF4 linear does every forward): Gparam/s and GB/s (bytes read + written: 0.5 + 2 per parameter),
  next to bitsandbytes' `dequantize_4bit` and next to a plain torch copy of a bf16 tensor of the same
  shape (read 2 + write 2 bytes per element), the bandwidth torch reaches on this machine.
Medians over repeats; every figure comes from the same process.

    python -m bench.nf4 [--quick] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from adapterhub import nf4
from bench.timing import median_seconds

SHAPES = ((4096, 4096), (11008, 4096))



def bitsandbytes_functional():
    try:
        import bitsandbytes.functional as bnb_functional  # noqa: PLC0415 (optional baseline)
    except ImportError:
        return None
    return bnb_functional


def bench_shape(shape, repeats: int, bnb) -> list[tuple[str, str, str]]:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    n = w.numel()
    rows = []
    t_quant = median_seconds(lambda: nf4.quantize(w), repeats)
    rows.append(("quantize adapterhub", f"{n / t_quant / 1e6:8.0f} Mparam/s", ""))
    if bnb is not None:
        t_bnb = median_seconds(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), repeats)
        rows.append(("quantize bitsandbytes", f"{n / t_bnb / 1e6:8.0f} Mparam/s", f"adapterhub {t_bnb / t_quant:5.1f}x faster"))

    q = nf4.quantize(w)
    out = torch.empty_like(w)
    t_deq = median_seconds(lambda: nf4.dequantize_into(q, out), repeats)  # the absmax is decoded once, on q
    copy_src, copy_dst = torch.empty_like(w), torch.empty_like(w)
    t_copy = median_seconds(lambda: copy_dst.copy_(copy_src), repeats)
    deq_bytes, copy_bytes = n * 2.5, n * 4.0
    bandwidth = copy_bytes / t_copy / 1e9
    deq_gbs = deq_bytes / t_deq / 1e9
    rows.append(("dequantize adapterhub", f"{n / t_deq / 1e9:8.2f} Gparam/s", f"{deq_gbs:5.1f} GB/s = {deq_gbs / bandwidth:4.0%} of copy"))
    if bnb is not None:
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        t_bnb_deq = median_seconds(lambda: bnb.dequantize_4bit(packed, state), repeats)
        rows.append(("dequantize bitsandbytes", f"{n / t_bnb_deq / 1e9:8.2f} Gparam/s",
                     f"{deq_bytes / t_bnb_deq / 1e9:5.1f} GB/s; adapterhub {t_bnb_deq / t_deq:4.2f}x"))  # fmt: skip
    rows.append(("torch copy bf16 (bandwidth)", f"{n / t_copy / 1e9:8.2f} Gelem/s", f"{bandwidth:5.1f} GB/s"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 4096x4096 weight only, 3 repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bnb = bitsandbytes_functional()
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bitsandbytes: {'yes' if bnb else 'not installed'}")
    for shape in shapes:
        print(f"\nbf16 weight {shape[0]}x{shape[1]} (blocksize 64, double quant), medians of {repeats}")
        for name, figure, note in bench_shape(shape, repeats, bnb):
            print(f"  {name:30s} {figure}  {note}")


if __name__ == "__main__":
    main()
