"""The decode step's fused CPU ops (csrc/decode_cpu.c): RMSNorm with the residual add, rotary + paged-cache
write + attention over the blocks in place, SiLU(gate) * up, and the few-row bf16 GEMV of the lm_head.

:func:`kernels` returns a :class:`DecodeKernels` over the same compiled library as the 4-bit and LoRA
kernels (kernels/compiled.py loads it once per process), or None where it cannot run (then the model keeps
its torch layers, the twin these ops are tested against). The model decides where they apply
(model/model.py: CPU, bf16 or fp32, one token per row on the paged cache, no autograd, no attention
soft-cap) and builds every tensor it passes: the methods check nothing, as the C functions trust their
inputs (a wrong shape is memory corruption, not an error).

Semantics, rounding for rounding, are in csrc/decode_cpu.c's header: each op is its torch twin's up to the
order of the fp32 sums and expf against torch's vectorised exp (and, for the GEMV on CPUs with
AVX512-BF16, bf16 subnormal inputs read as zero). How far apart they may be is :data:`TOLERANCE`.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from adapterhub.runtime.kernels import compiled

# |fused - torch| <= atol + rtol * |torch| per op on random inputs (tests/runtime/test_decode_kernels.py):
# fp32, sums in another order; bf16, one output rounding either way (2^-8 relative) on top of that.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2**-7)}
DTYPES = (torch.float32, torch.bfloat16)  # activations the kernels take
GEMV_MAX_ROWS = 8  # rows up to which the bf16 GEMV beats torch's (oneDNN) for the lm_head

_P, _I, _C, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # name: (argument types, return type)
    "decode_rmsnorm": ((_P, _P, _P, _P, _I, _I, _F, _C, _C), None),  # x, res, w, out, rows, D, eps, bf16, offset
    "decode_silu_mul": ((_P, _P, _I, _P, _I, _I, _C), None),  # gate, up, ld, out, rows, F, bf16
    # q, k, v, ldq, ldkv, cos, sin, kc, vc, nblocks, bs, pos, tables, nt, span, B, H, Hkv, Dh, scale, window, bf16, out
    "decode_attention": ((_P, _P, _P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _I, _I, _F, _I, _C, _P),
                         None),
    "decode_linear_bf16": ((_P, _I, _I, _P, _I, _P), None),  # x, M, K, W, N, y
}


@functools.cache
def kernels() -> DecodeKernels | None:
    """The process's decode kernels, or None where the compiled library does not run (or lacks them)."""
    library = compiled.library()
    if library is None:
        return None
    lib = library.lib
    lib.decode_kernels_available.argtypes, lib.decode_kernels_available.restype = (), _C
    if not lib.decode_kernels_available():
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return DecodeKernels(lib)


@dataclass(frozen=True, eq=False)
class DecodeKernels:
    lib: ctypes.CDLL

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
                is_offset: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """model/layers.py's RMSNorm of each row of x, after ``x += residual`` in place when given.

        Semantics:
            x = x + residual                                   # when residual is not None, written into x
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            out = weight * h.to(x.dtype)                       # Llama
            out = (h * (1 + weight.float())).to(x.dtype)       # is_offset (Gemma)

        x, residual, out: contiguous (..., D) of one dtype in DTYPES; weight (D,) contiguous in that dtype.
        Returns out (new when None).
        """
        D = x.shape[-1]
        out = torch.empty_like(x) if out is None else out
        res = None if residual is None else residual.data_ptr()
        self.lib.decode_rmsnorm(x.data_ptr(), res, weight.data_ptr(), out.data_ptr(), x.numel() // D, D, eps,
                                x.dtype == torch.bfloat16, is_offset)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Semantics: ``out = F.silu(gate) * up`` (two roundings in bf16, as torch).

        gate, up (B, 1, F): each row's F elements contiguous, rows `gate.stride(0)` apart (the halves of a
        fused gate_up output are views); out contiguous (B, 1, F). Returns out (new when None)."""
        B, _, F_ = gate.shape
        out = torch.empty(B, 1, F_, dtype=gate.dtype) if out is None else out
        self.lib.decode_silu_mul(gate.data_ptr(), up.data_ptr(), gate.stride(0), out.data_ptr(), B, F_,
                                 gate.dtype == torch.bfloat16)
        return out

    def attention(self, q, k, v, cos, sin, k_cache, v_cache, layer: int, positions, tables, span: int, *, heads: int,
                  kv_heads: int, scale: float, window: int | None, out: torch.Tensor) -> torch.Tensor:
        """Rotary on q and k, k / v written to the paged cache, attention over each row's blocks; one token per row.

        Semantics (for every row b; p = positions[b], blk(j) = tables[b, j // bs], bs the block size):
            q, k = apply_rope(q, cos[b], sin[b]), apply_rope(k, cos[b], sin[b])    # model/rope.py's roundings
            k_cache[layer, :, blk(p), p % bs], v_cache[...] = k[b], v[b]          # (Hkv, Dh) each
            keys j: 0 <= j <= p, and j > p - window when window is set
            out[b, h] = softmax((q[b, h] . K_j) * scale, float32) @ V_j          # K, V of head h // (H / Hkv)
        with the softmax as torch's CPU flash attention computes it for keys 0..span-1, the keys not listed above
        masked (csrc/decode_cpu.c): span = max(positions) + 1, the key span of the torch path (CacheStep.span).

        q (B, 1, H*Dh), k, v (B, 1, Hkv*Dh): each row contiguous, rows stride(0) apart (views of a fused qkv
        output are fine; k and v with the same stride); cos, sin (B, 1, 1, Dh) contiguous; k_cache, v_cache
        the paged cache's (L, Hkv, 1 + NB, bs, Dh); positions (B,) and tables (B, nt) contiguous int64 with
        the blocks of positions 0..p allocated; out (B, 1, H*Dh) contiguous. Returns out.
        """
        B, Dh = q.shape[0], cos.shape[-1]
        _, _, nblocks, bs, _ = k_cache.shape
        offset = layer * k_cache.stride(0) * k_cache.element_size()
        self.lib.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), cos.data_ptr(),
                                  sin.data_ptr(), k_cache.data_ptr() + offset, v_cache.data_ptr() + offset, nblocks, bs,
                                  positions.data_ptr(), tables.data_ptr(), tables.shape[1], span, B, heads, kv_heads,
                                  Dh, scale, window or 0, q.dtype == torch.bfloat16, out.data_ptr())
        return out

    def linear_bf16(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Semantics: ``y = F.linear(x, W)`` in bf16 (fp32 sums, one rounding). x (..., K), W (N, K), both
        contiguous bf16. Returns y (..., N)."""
        K, N = x.shape[-1], W.shape[0]
        y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
        self.lib.decode_linear_bf16(x.data_ptr(), x.numel() // K, K, W.data_ptr(), N, y.data_ptr())
        return y
