"""`BaseWeight`: what a frozen base layer's weight W (Dout, Din) is to the rest of the runtime, in any format.

The adapter layers (adapters/linear.py), the loader (model/loader.py) and merge (adapters/merge.py) only use
this protocol; each format is one file: quant/dense.py, quant/nf4.py, quant/fp4.py (the 4-bit ones share
quant/fourbit.py), listed in quant/formats.py. docs/architecture.md says how to add one.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class BaseWeight(Protocol):
    format: ClassVar[str]  # "dense" | "nf4" | "fp4": the key in quant/formats.py
    is_quantized: ClassVar[bool]  # whether replaced_by loses precision (merging reports the error)
    shape: tuple[int, ...]  # (Dout, Din)

    @property
    def device(self) -> torch.device: ...

    @property
    def nbytes(self) -> int:
        """Bytes held (the packed codes and their scales for a quantized weight)."""

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., Din) -> x @ W^T (+ bias) (..., Dout) in x.dtype, W dequantized to x.dtype first (semantics
        §1.6). Differentiable in x (W is frozen): a gradient reaches whatever produced x."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (Dout, Din) in `dtype` (default: the format's own); may alias storage: never write into it."""

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The checkpoint keys of this weight under a module prefix (e.g. "model.layers.0.mlp.up_proj."),
        as transformers (+ bitsandbytes) writes them."""

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", *,
                        dtype: torch.dtype) -> BaseWeight:
        """Adopt the keys `state_dict` writes, validated; dtype: the compute dtype a dense weight is kept in."""

    @classmethod
    def quantize(cls, W: torch.Tensor, *, dtype: torch.dtype) -> BaseWeight:
        """Store a dense (Dout, Din) weight in this format; W is first rounded to the compute `dtype`."""

    def replaced_by(self, W: torch.Tensor) -> BaseWeight:
        """A weight of the same format and settings holding W (merge: requantize for a quantized format)."""
