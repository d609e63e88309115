"""`CpuOps`: the torch ops, with the compiled CPU kernels (kernels/compiled.py) where they apply.

Which inputs go to a kernel (anything else, and anything autograd must see, takes the torch op):
- LoRA shrink / expand: bf16 on a CPU with AVX-512 BW. Each row streams its own slot, so a row's
  result does not depend on the rest of its batch.
- 4-bit linear (any 16-value codebook: NF4, FP4): G = 64, in_features % 64 == 0, bf16 or fp32, up to
  ``fused_4bit_rows[dtype]`` rows (bf16: 32 with AMX, 16 with AVX512-BF16, else 4; fp32: 16); more rows
  dequantize with the compiled kernels (bf16: the byte-shuffle one) into scratch, then one GEMM
  (``Ops.linear``: its rows bucketed, ops.py).
- 4-bit dequantize: whole blocks, any dtype and block size; the short last block in torch.
- blockwise quantize: NF4 codes (FP4 and the double-quant map stay in torch: quantizing runs once, at load).
"""

from __future__ import annotations

import torch

from adapterhub.runtime.kernels.compiled import G, CompiledLibrary
from adapterhub.runtime.kernels.codebook import Codebook
from adapterhub.runtime.kernels.ops import Ops


class CpuOps(Ops):
    name = "cpu-compiled"

    def __init__(self, device: torch.device | str, library: CompiledLibrary, **kwargs):
        super().__init__(device, **kwargs)
        self.library = library
        self.has_compiled_lora = library.has_lora
        self.fused_4bit_max_rows = library.fused_max_rows  # bf16
        self.fused_4bit_rows = {torch.bfloat16: library.fused_max_rows, torch.float32: library.fused_max_rows_fp32}

    def lora_shrink(self, x, A_stack, ids):
        if self.has_compiled_lora and x.dtype == torch.bfloat16 and not self.needs_grad(x, A_stack):
            return self.library.lora_shrink(x.contiguous(), A_stack, ids, check=False)  # stacks: built by the pool
        return super().lora_shrink(x, A_stack, ids)

    def lora_expand(self, y, h, B_stack, ids, scaling, dora_scale=None):
        is_bf16 = y.dtype == torch.bfloat16 and y.is_contiguous()
        if self.has_compiled_lora and is_bf16 and not self.needs_grad(y, h, B_stack, dora_scale):
            return self.library.lora_expand(y, h.contiguous(), B_stack, ids, scaling, dora_scale, check=False)
        return super().lora_expand(y, h, B_stack, ids, scaling, dora_scale)

    def dequantize_4bit(self, packed, absmax, codebook: Codebook, blocksize: int, out):
        n = out.numel()
        full = n - n % blocksize
        ok = codebook.values.numel() == 16 and out.device.type == "cpu" and out.is_contiguous()
        if not (ok and packed.is_contiguous() and absmax.is_contiguous() and full and not self.needs_grad(absmax)):
            return super().dequantize_4bit(packed, absmax, codebook, blocksize, out)
        flat, packed = out.view(-1), packed.view(-1)
        whole = packed[: full // 2], absmax[: full // blocksize], codebook.values
        if out.dtype == torch.bfloat16 and blocksize == G:  # the byte-shuffle kernel, ~2.5x faster
            self.library.dequantize_4bit_bf16(*whole, full // G, G, out=flat[:full].view(-1, G))
        else:
            self.library.dequantize_4bit(*whole, blocksize, flat[:full])
        if full < n:  # the short last block (rare: real weights hold whole blocks)
            tail = torch.empty(n - full, dtype=out.dtype)
            super().dequantize_4bit(packed[full // 2 :], absmax[-1:], codebook, blocksize, tail)
            flat[full:] = tail
        return out

    def linear_4bit(self, x, packed, absmax, codebook: Codebook, blocksize: int, out_features: int, in_features: int):
        rows = x.numel() // in_features
        fusable = (codebook.values.numel() == 16 and blocksize == G and in_features % G == 0 and x.device.type == "cpu"
                   and x.dtype in self.fused_4bit_rows and x.shape[-1] == in_features and packed.dtype == torch.uint8
                   and absmax.dtype == torch.float32 and packed.is_contiguous()
                   and absmax.is_contiguous() and 2 * packed.numel() == G * absmax.numel() == out_features * in_features
                   and not self.needs_grad(x, absmax))
        if not fusable:
            return super().linear_4bit(x, packed, absmax, codebook, blocksize, out_features, in_features)
        code, N, K = codebook.values, out_features, in_features
        if rows <= self.fused_4bit_rows[x.dtype]:  # the weight's sizes and dtypes checked just above
            return self.library.linear_4bit(x, packed, absmax, code, N, K, check=False)
        W = self.scratch(N, K, x.dtype)
        if x.dtype == torch.bfloat16:
            self.library.dequantize_4bit_bf16(packed, absmax, code, N, K, out=W)
        else:
            self.library.dequantize_4bit(packed.view(-1), absmax, code, G, W.view(-1))
        return self.linear(x, W)

    def quantize_blockwise(self, x, codebook: Codebook, blocksize: int):
        if codebook.name == "nf4" and x.device.type == "cpu" and x.is_contiguous():
            return self.library.nf4_quantize(x.view(-1), blocksize)  # bit-identical to kernels/blockwise.py
        return super().quantize_blockwise(x, codebook, blocksize)
