"""`FourBitWeight`: a bitsandbytes 4-bit weight (NF4, FP4) with double quantization, the `BaseWeight` protocol.

A subclass names its format and its 16-value codebook (quant/nf4.py, quant/fp4.py); everything else is
shared, because bitsandbytes stores every 4-bit type the same way (docs/semantics.md §1.3-§3.1):
the weight flattened row-major, blocks of G elements, absmax per block, two codes per byte (element 2k
in the high nibble), and with double quantization the absmax vector itself quantized to 8-bit indices
into the signed dynamic map over nested blocks of 256, after subtracting its torch float32 mean (§2.1).
Dequantization is float32 code * absmax, then round-to-nearest-even to the target dtype (§1.5).

Shapes: n weight elements, G = blocksize, B = ceil(n / G) blocks, B2 = ceil(B / 256).
The per-element work runs through the device's `Ops` (kernels/): compiled or CUDA kernels where they
exist for the codebook, torch elsewhere; the absmax is decoded to float32 once, never per forward.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from adapterhub.errors import QuantizationError
from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Codebook, Ops
from adapterhub.runtime.quant import bnb_state, tables
from adapterhub.runtime.quant.bnb_state import DTYPE_NAMES, STATE_SUFFIX

# §2.2: exact nearest entry, ties lower (bitsandbytes' CPU table is an approximation, §2.3)
DYNAMIC = Codebook.exact_nearest("dynamic8", tables.DYNAMIC_CODE, shift=17)


@dataclass(frozen=True, eq=False)
class FourBitWeight:
    """packed: uint8 ((n+1)//2, 1), two codes per byte, high nibble first (§1.4).
    absmax: float32 (B,) block absmax, or with double quantization uint8 (B,) dynamic-map indices.
    nested_absmax: float32 (B2,) and offset: float32 0-d tensor, with double quantization only.
    shape / dtype: the original weight's shape and dtype (bitsandbytes' quant_state), dequantize's default.
    """

    format: ClassVar[str]  # bitsandbytes' quant_type
    codebook: ClassVar[Codebook]
    is_quantized: ClassVar[bool] = True

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = tables.DEFAULT_BLOCKSIZE
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = tables.NESTED_BLOCKSIZE

    # --- properties ----------------------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.nested_absmax)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @functools.cached_property
    def ops(self) -> Ops:
        return kernels.ops_for(self.device)

    @functools.cached_property
    def absmax_f32(self) -> torch.Tensor:
        """Per-block absmax as float32 (B,), double quantization undone (§2.1.5), contiguous."""
        if not self.double_quant:
            return self.absmax.float().contiguous()
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return tables.DYNAMIC_CODE.to(self.device)[self.absmax.long()].mul_(scale).add_(self.offset).contiguous()

    # --- the BaseWeight protocol ---------------------------------------------------------------------

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = _Linear4bit.apply(x, self) if Ops.needs_grad(x) else self.linear(x)  # (..., Dout)
        return y if bias is None else y.add_(bias)

    def linear(self, x: torch.Tensor, ops: Ops | None = None) -> torch.Tensor:
        """x (..., Din) -> (..., Dout) in x.dtype through `ops` (default: this device's), not differentiable."""
        Dout, Din = self.shape
        return (ops or self.ops).linear_4bit(x, self.packed, self.absmax_f32, self.codebook, self.blocksize, Dout, Din)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        return self.dequantize_into(out)

    def dequantize_into(self, out: torch.Tensor, ops: Ops | None = None) -> torch.Tensor:
        """Semantics: out[j] = dtype(float32(CODE[code_j] * absmax[j // G])), round to nearest even (§1.5).
        out: contiguous, numel elements, float32 / bf16 / fp16 (any shape). Returns out."""
        return (ops or self.ops).dequantize_4bit(self.packed, self.absmax_f32, self.codebook, self.blocksize, out)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """bitsandbytes' packed state dict (§3.1): prefix + weight, weight.absmax, weight.quant_map,
        [weight.nested_absmax, weight.nested_quant_map,] weight.quant_state.bitsandbytes__<type>."""
        p = prefix + "weight"
        state = {"quant_type": self.format, "blocksize": self.blocksize, "dtype": DTYPE_NAMES[self.dtype],
                 "shape": list(self.shape)}
        sd = {p: self.packed, f"{p}.absmax": self.absmax, f"{p}.quant_map": self.codebook.values.clone()}
        if self.double_quant:
            sd[f"{p}.nested_absmax"] = self.nested_absmax
            sd[f"{p}.nested_quant_map"] = tables.DYNAMIC_CODE.clone()
            nested = {"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32"}
            state.update(nested, nested_offset=self.offset.item())  # a float32 value: repr round-trips
        blob = json.dumps(state).encode("utf-8")  # default separators, this field order (§3.1)
        sd[p + STATE_SUFFIX + self.format] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", *, dtype: torch.dtype | None = None):
        """Adopt a bitsandbytes / transformers 4-bit state dict (the keys of `state_dict`), validated.
        dtype is not used: a 4-bit weight keeps the dtype its quant_state names."""
        return cls(**bnb_state.parse(sd, prefix + "weight", cls.format, cls.codebook.values))

    @classmethod
    @torch.no_grad()  # quantization is not differentiable; a Parameter (requires_grad) is fine as input
    def quantize(cls, W: torch.Tensor, *, dtype: torch.dtype | None = None, blocksize: int = tables.DEFAULT_BLOCKSIZE,
                 double_quant: bool = True):
        """Quantize a float32 / bf16 / fp16 weight of any shape, as bitsandbytes'
        `quantize_4bit(W.to(dtype), blocksize, quant_type, compress_statistics=double_quant)` (§1-§2).
        The double-quant offset is torch's float32 mean of the block absmax, as bitsandbytes computes it;
        torch's summation order can depend on the thread count (1 ulp): the stored value is what counts."""
        W = W if dtype is None else W.to(dtype)
        _check_quantizable(W, blocksize)
        ops = kernels.ops_for(W.device)
        packed, absmax = ops.quantize_blockwise(W.contiguous().view(-1), cls.codebook, blocksize)  # row-major (§1.3)
        fields = {"packed": packed.view(-1, 1), "shape": tuple(W.shape), "dtype": W.dtype, "blocksize": blocksize}
        if not double_quant:
            return cls(absmax=absmax, **fields)
        offset = absmax.mean()  # float32 0-d (§2.1.2)
        q8, nested_absmax = ops.quantize_blockwise(absmax - offset, DYNAMIC, tables.NESTED_BLOCKSIZE)
        return cls(absmax=q8, nested_absmax=nested_absmax, offset=offset, **fields)

    def replaced_by(self, W: torch.Tensor):
        """Quantize W in this weight's dtype, blocksize and double-quant setting, as PEFT's 4-bit merge does
        (semantics §4.4: dequantize, add, re-quantize the result in the dequantized dtype)."""
        if tuple(W.shape) != tuple(self.shape):
            raise QuantizationError(f"weight shape {tuple(W.shape)} != (out, in) = {tuple(self.shape)}")
        return type(self).quantize(W.to(self.device), dtype=self.dtype, blocksize=self.blocksize,
                                   double_quant=self.double_quant)


class _Linear4bit(torch.autograd.Function):
    """x @ W^T with the frozen 4-bit W: forward through the ops, backward grad_x = grad_y @ W (dequantized)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return weight.linear(x)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.weight.dequantize(grad_y.dtype), None  # (..., Dout) @ (Dout, Din) -> (..., Din)


def _check_quantizable(W, blocksize: int) -> None:
    if not isinstance(W, torch.Tensor) or W.dtype not in DTYPE_NAMES:
        got = W.dtype if isinstance(W, torch.Tensor) else type(W).__name__
        raise QuantizationError(
            f"4-bit formats quantize float32, bfloat16 or float16 tensors, got {got}; convert with .to(torch.bfloat16)")
    if blocksize not in tables.BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize} is not one of {tables.BLOCKSIZES}; bitsandbytes' default is 64")
    if W.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty weight of shape {tuple(W.shape)}")
