"""The compiled CPU kernels as a typed object: 4-bit linear / dequantize, NF4 quantize, and the bf16 LoRA ops.

:func:`library` builds (kernels/build.py) and loads the library once per process and returns a
:class:`CompiledLibrary`, or None after one warning where the kernels cannot run (not Linux x86-64
with AVX-512, no compiler, a failed build, or ``ADAPTERHUB_DISABLE_CPU_KERNELS=1``, which turns off
the NF4 *and* the LoRA kernels). Its capabilities are fields; each method checks its arguments
(:class:`~adapterhub.errors.KernelArgumentError` / ``QuantizationError``) unless ``check=False``, which
``CpuOps`` passes for tensors it built itself (the checks cost ~1 us per tensor, a few % of a decode step).

4-bit linear (any 16-value codebook: NF4, FP4): the weight is exactly the torch path's,
``W = fp32(code * absmax)``, rounded to bf16 when x is bf16 (semantics §1.5); only the order of the fp32 sums
differs from ``dequantize`` then ``F.linear``.
fp32 x (any rows): AVX-512 FMAs over a 16-entry per-block table (vpermps lookup), 4 rows per decode. bf16 x:
with AMX and 2..32 rows, the weight decoded to bf16 tiles, 32 rows of x per pass over W; else with
AVX512-BF16 (any rows), each block decoded to bf16 once per 8 rows and 1-8 weight rows, multiplied with
VDPBF16PS (bf16 subnormals read as zero, products below 2^-126 flush to zero); else the fp32 FMAs. Bound:
``|y - y_torch| <= FUSED_LINEAR_TOLERANCE[dtype] * (|x| @ |W|^T)`` (kernels/tolerance.py).

LoRA shrink / expand (bf16, AVX-512 BW): kernels/ops.py's Semantics up to the order of the fp32 sums,
within one bf16 ulp of the exact result. Decode (T < 16 tokens per row) streams each row's slot once with
AVX512-BF16 dot products; prefill lays each row's slot out in bf16 pairs once and multiplies with AMX
tiles, or without AMX with VDPBF16PS register tiles. With AVX512-BF16, bf16 subnormal inputs read as zero.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from dataclasses import dataclass

import torch

from adapterhub.errors import KernelArgumentError, QuantizationError
from adapterhub.runtime.kernels import build
from adapterhub.runtime.quant.tables import BLOCKSIZES

G = 64  # the block size the fused linear and bf16 dequantize support (semantics §1.3)
# Rows (M = B*T) up to which the fused linear beats dequantize + F.linear, per capability, from
# bench/nf4_linear.py on an EPYC Zen 4 (2 cores, AVX512-BF16, no AMX; torch 2.13, 2 threads; a shared machine,
# so +-30%). Fused / dequantize + GEMM per call on the 135M shapes 576x576, 192x576, 1536x576, 576x1536:
# - bf16 on VDPBF16PS: M=1 0.22-0.28 (15 / 11 / 23 / 21 us), M=8 0.35-0.66 (35 / 19 / 72 / 62 us, 0.8-0.9x
#   dense bf16), M=16 0.44-1.04, M=32 0.72-1.46; the 1B shapes (2048x2048, 8192x2048, 2048x8192) 0.42-0.45
#   at M=16. Before (fp32 FMAs, 1-2 rows): M=1 21 / 13 / 39 / 36 us, M=8 via dequantize + GEMM
#   66 / 50 / 129 / 113 us. M=8 runs at ~90% of the core's VDPBF16PS rate (1.66 G/s measured): compute-bound.
# - bf16 on fp32 FMAs (AVX-512 F only): W decoded again per 4 rows; M=4 0.57-0.83, M=8 1.1-1.5.
# - bf16 on AMX: 32 rows share one pass over W (Xeon).
# - fp32 (FMAs): M=1..8 0.27-0.41, M=16 0.62-0.67, M=32 0.97-1.13.
FUSED_MAX_ROWS = {"amx": 32, "dpbf16": 16, "fma": 4, "fp32": 16}

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # name: (argument types, return type)
    "lut4_linear": ((_P, _C, _I, _I, _I, _P, _P, _P, _P), None),  # x, is_bf16, M, N, K, packed, absmax, code, y
    "lut4_dequantize_bf16": ((_P, _P, _I, _P, _P), None),  # packed, absmax, n, code, out
    "lut4_amx_enable": ((), _C),
    "lut4_dpbf16_enable": ((_C,), _C),  # enable (1 on, 0 off, -1 only ask) -> 1 where the path is on
    "lut4_dp_prefetch_l2": ((_C,), _C),  # 1 prefetch W into L2 (default), 0 into L1 (as before)
    "nf4_quantize": ((_P, _C, _I, _I, _P, _P), None),  # x, kind, n, blocksize, absmax, packed
    "lut4_dequantize": ((_P, _P, _I, _I, _C, _P, _P), None),  # packed, absmax, n, blocksize, kind, code, out
    "lora_kernels_available": ((), _C),
    "lora_amx_enable": ((), _C),
}
_LORA_SIGNATURES = {  # only where lora_kernels_available() (AVX-512 BW)
    "lora_shrink_bf16": ((_P, _P, _P, _I, _I, _I, _I, _P), None),  # x, A, ids, B, T, R, Din, h
    "lora_expand_bf16": ((_P, _P, _P, _P, _P, _P, _I, _I, _I, _I), None),  # y, h, BT, ids, scaling, dora, B, T, R, Dout
}
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C functions' dtype codes
_LORA_DTYPES = {"scaling": torch.float32, "dora_scale": torch.float32}  # every other LoRA tensor: bf16


@functools.cache
def library() -> CompiledLibrary | None:
    """The process's compiled kernels (built on the first call), or None where they cannot run."""
    if build.is_disabled():
        return None
    try:
        lib = ctypes.CDLL(str(build.build()))
    except (OSError, build.BuildError) as error:
        warnings.warn(f"adapterhub: compiled CPU kernels unavailable, using the torch path ({error})", stacklevel=2)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    has_lora = bool(lib.lora_kernels_available())
    for name, (argtypes, restype) in _LORA_SIGNATURES.items() if has_lora else ():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    has_amx, has_dpbf16 = bool(lib.lut4_amx_enable()), bool(lib.lut4_dpbf16_enable(-1))
    bf16_path = "amx" if has_amx else "dpbf16" if has_dpbf16 else "fma"
    return CompiledLibrary(lib, has_lora=has_lora, has_amx_lora=bool(lib.lora_amx_enable()), has_dpbf16=has_dpbf16,
                           fused_max_rows=FUSED_MAX_ROWS[bf16_path], fused_max_rows_fp32=FUSED_MAX_ROWS["fp32"])


@dataclass(frozen=True, eq=False)
class CompiledLibrary:
    lib: ctypes.CDLL
    has_lora: bool  # the bf16 LoRA kernels (AVX-512 BW); the 4-bit ones need only AVX-512 F
    has_amx_lora: bool  # LoRA prefill on AMX tiles (else VDPBF16PS register tiles)
    has_dpbf16: bool  # bf16 linear_4bit on VDPBF16PS (AVX512-BF16) where AMX does not take it
    fused_max_rows: int  # bf16 rows up to which linear_4bit beats dequantize + GEMM on this CPU
    fused_max_rows_fp32: int  # the same for fp32 x

    def use_dpbf16(self, enable: bool | None = None) -> bool:
        """Turn the VDPBF16PS path on or off for the process (None: only ask; tests and benchmarks compare
        it with the fp32-FMA path). Returns whether it is on; always False where the CPU lacks it."""
        return bool(self.lib.lut4_dpbf16_enable(-1 if enable is None else int(enable)))

    def prefetch_l2(self, enable: bool | None = None) -> bool:
        """Where the VDPBF16PS path prefetches W: True (default) into L2, False into L1 as it did before
        (benchmarks compare the two); None only asks. Results are identical either way."""
        return bool(self.lib.lut4_dp_prefetch_l2(-1 if enable is None else int(enable)))

    # --- 4-bit weights -------------------------------------------------------------------------------

    def linear_4bit(self, x, packed, absmax_f32, code, out_features: int, in_features: int, out=None, *,
                    check: bool = True) -> torch.Tensor:
        """Fused 4-bit linear without bias, for few rows (decode); see :attr:`fused_max_rows`.

        Semantics: ``y = (x.float() @ W.to(x.dtype).float().T).to(x.dtype)`` with W the dequantized (N, K)
        weight, up to the order of the fp32 sums. x (..., K) bf16 or fp32; packed uint8 with N*K/2 bytes
        (any shape, e.g. bnb's (N*K/2, 1)), element 2k in the high nibble (semantics §1.4); absmax_f32
        (N*K/G,) float32 per block of G = 64, double quant decoded; code (16,) float32, the value of each
        4-bit code (NF4 §1.1, FP4 §11.1); K % 64 == 0. Returns y (..., N). ``check=False`` skips checking the
        weight and x (CpuOps, which checked them): wrong sizes then read or write out of bounds.
        """
        N, K = out_features, in_features
        if check:
            _check_weight(packed, absmax_f32, code, N, K)
            if x.dtype not in (torch.bfloat16, torch.float32) or x.device.type != "cpu" or x.shape[-1] != K:
                raise QuantizationError(f"linear_4bit needs a CPU bf16 or float32 x with last dim in_features={K}, "
                                        f"got {tuple(x.shape)} {x.dtype} on {x.device}; convert x or use torch")
        x = x.contiguous()
        if out is None:
            y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
        else:
            y = _output(out, (*x.shape[:-1], N), x.dtype, "y")
        self.lib.lut4_linear(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // K, N, K, packed.data_ptr(),
                             absmax_f32.data_ptr(), code.data_ptr(), y.data_ptr())
        return y

    def dequantize_4bit_bf16(self, packed, absmax_f32, code, out_features: int, in_features: int,
                             out=None) -> torch.Tensor:
        """``W[i] = bf16(code[q_i] * absmax_f32[i // 64])``, product in fp32 (semantics §1.5), bit-identical to
        the torch path. Arguments as in :meth:`linear_4bit`. Returns W (N, K) bf16 (into ``out``)."""
        N, K = out_features, in_features
        _check_weight(packed, absmax_f32, code, N, K)
        w = _output(out, (N, K), torch.bfloat16, "W")
        self.lib.lut4_dequantize_bf16(packed.data_ptr(), absmax_f32.data_ptr(), N * K, code.data_ptr(), w.data_ptr())
        return w

    def nf4_quantize(self, x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise NF4 codes of x, bit-identical to the torch encoder (semantics §1.2-1.4).

        x: contiguous CPU float32 / bf16 / fp16, n elements, read row-major; a short last block is
        zero-padded. Returns (packed uint8 (ceil(n/2),), element 2k in the high nibble, odd n ending in
        nibble 7; absmax float32 (ceil(n/G),)), where s = x * fp32(1 / max(absmax, 1e-38)) picks the code.
        """
        ok = isinstance(x, torch.Tensor) and x.dtype in _KINDS and x.device.type == "cpu" and x.is_contiguous()
        if not ok or x.numel() == 0:
            got = (tuple(x.shape), x.dtype, x.device, x.is_contiguous()) if isinstance(x, torch.Tensor) else type(x)
            raise QuantizationError(
                f"nf4_quantize needs a non-empty contiguous CPU float32 / bfloat16 / float16 tensor, got "
                f"(shape, dtype, device, contiguous)={got}; call .contiguous() or use the torch encoder")
        _check_blocksize(blocksize)
        n = x.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
        self.lib.nf4_quantize(x.data_ptr(), _KINDS[x.dtype], n, blocksize, absmax.data_ptr(), packed.data_ptr())
        return packed, absmax

    def dequantize_4bit(self, packed, absmax_f32, code, blocksize: int, out: torch.Tensor) -> torch.Tensor:
        """Whole blocks: ``out[i] = dtype(fp32(code[q_i] * absmax_f32[i // G]))``, round to nearest even.

        out: contiguous CPU float32 / bf16 / fp16 of n elements, n % blocksize == 0; packed: contiguous
        uint8 of n/2 bytes (any shape); absmax_f32: contiguous float32 of n/G values; code (16,) float32.
        Returns out.
        """
        _check_blocksize(blocksize)
        _check_code(code)
        if out.dtype not in _KINDS or out.device.type != "cpu" or not out.is_contiguous() or out.numel() % blocksize:
            raise QuantizationError(
                f"out must be a contiguous CPU float32 / bfloat16 / float16 tensor of whole blocks of {blocksize}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
        n = out.numel()
        for t, dtype, count, name in ((packed, torch.uint8, n // 2, "packed"),
                                      (absmax_f32, torch.float32, n // blocksize, "absmax_f32")):
            if t.dtype != dtype or t.numel() != count or not t.is_contiguous() or t.device.type != "cpu":
                raise QuantizationError(
                    f"{name} must be a contiguous CPU {dtype} tensor of {count} values for {n} elements in blocks "
                    f"of {blocksize}, got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
        self.lib.lut4_dequantize(packed.data_ptr(), absmax_f32.data_ptr(), n, blocksize, _KINDS[out.dtype],
                                 code.data_ptr(), out.data_ptr())
        return out

    # --- LoRA (bf16) -------------------------------------------------------------------------------

    def lora_shrink(self, x, A_stack, ids, *, check: bool = True) -> torch.Tensor:
        """ops.lora_shrink for bf16: x (B, T, Din), A_stack (N, R, Din) bf16 contiguous, ids (B,) int64 in
        [0, N) (the range is always trusted: the pool maps adapters to slots) -> h (B, T, R) bf16."""
        self._require_lora()
        Bsz, T, Din = x.shape
        R = A_stack.shape[1]
        if check:
            _check_lora("lora_shrink", ids, Bsz, x=(x, (Bsz, T, Din)), A_stack=(A_stack, (A_stack.shape[0], R, Din)))
        h = torch.empty(Bsz, T, R, dtype=torch.bfloat16)
        self.lib.lora_shrink_bf16(x.data_ptr(), A_stack.data_ptr(), ids.data_ptr(), Bsz, T, R, Din, h.data_ptr())
        return h

    def lora_expand(self, y, h, B_stack, ids, scaling, dora_scale, *, check: bool = True) -> torch.Tensor:
        """ops.lora_expand for bf16, in place, with its Semantics' roundings (the DoRA scale applied in fp32,
        then rounded once). y (B, T, Dout), h (B, T, R), B_stack (N, R, Dout) bf16; scaling (N,) and
        dora_scale (N, Dout) | None fp32; all contiguous; ids (B,) int64. Returns y."""
        self._require_lora()
        Bsz, T, Dout = y.shape
        N, R = B_stack.shape[0], h.shape[-1]
        if check:
            tensors = {"y": (y, (Bsz, T, Dout)), "h": (h, (Bsz, T, R)), "B_stack": (B_stack, (N, R, Dout)),
                       "scaling": (scaling, (N,))}
            if dora_scale is not None:
                tensors["dora_scale"] = (dora_scale, (N, Dout))
            _check_lora("lora_expand", ids, Bsz, **tensors)
        dora = None if dora_scale is None else dora_scale.data_ptr()
        self.lib.lora_expand_bf16(y.data_ptr(), h.data_ptr(), B_stack.data_ptr(), ids.data_ptr(), scaling.data_ptr(),
                                  dora, Bsz, T, R, Dout)
        return y

    def _require_lora(self) -> None:
        if not self.has_lora:
            raise KernelArgumentError("the compiled LoRA kernels need AVX-512 BW, which this CPU lacks; check "
                                      "CompiledLibrary.has_lora and use the torch ops (kernels/ops.py)")


# --- validation ---------------------------------------------------------------------------------


def _check_code(code: torch.Tensor) -> None:
    if code.dtype != torch.float32 or tuple(code.shape) != (16,) or not code.is_contiguous() or code.device.type != "cpu":
        raise QuantizationError(f"code must be the 16 float32 values of a 4-bit format on the CPU, got "
                                f"{tuple(code.shape)} {code.dtype} on {code.device}")


def _check_weight(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, N: int, K: int) -> None:
    _check_code(code)
    if K <= 0 or N <= 0 or K % G:
        raise QuantizationError(f"the CPU 4-bit kernels need in_features a positive multiple of {G}, got (out_features, "
                                f"in_features)=({N}, {K}); use the torch dequantize path for this layer")
    if packed.dtype != torch.uint8 or packed.numel() != N * K // 2 or not packed.is_contiguous():
        raise QuantizationError(
            f"packed 4-bit weight must be a contiguous uint8 tensor of N*K/2={N * K // 2} bytes for (N, K)=({N}, {K}), "
            f"got {tuple(packed.shape)} {packed.dtype} (contiguous={packed.is_contiguous()})")
    if absmax.dtype != torch.float32 or absmax.numel() != N * K // G or not absmax.is_contiguous():
        raise QuantizationError(f"absmax must be a contiguous float32 tensor of N*K/{G}={N * K // G} values (double "
                                f"quant decoded), got {tuple(absmax.shape)} {absmax.dtype}; decode it first")
    if packed.device.type != "cpu" or absmax.device.type != "cpu":
        raise QuantizationError(f"the CPU 4-bit kernels need CPU tensors, got {packed.device} / {absmax.device}")


def _check_lora(op: str, ids: torch.Tensor, rows: int, **tensors: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Each name=(tensor, expected shape) is a contiguous CPU tensor of that shape and its dtype; ids (rows,) int64."""
    for name, (t, shape) in tensors.items():
        dtype = _LORA_DTYPES.get(name, torch.bfloat16)
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
            raise KernelArgumentError(
                f"{op}: {name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {tuple(t.shape)} "
                f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()}); use the torch ops, which take any dtype")
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous() or tuple(ids.shape) != (rows,):
        raise KernelArgumentError(f"{op}: ids must be a contiguous CPU int64 tensor of shape ({rows},), got "
                                  f"{tuple(ids.shape)} {ids.dtype} on {ids.device}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize} is not one of {BLOCKSIZES} (semantics §1.3)")


def _output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise QuantizationError(f"out for {name} must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                                f"{tuple(out.shape)} {out.dtype} (contiguous={out.is_contiguous()}) on {out.device}")
    return out
