"""NF4 + double quantization, bit-identical to bitsandbytes (docs/semantics.md §1-§3): the public functions.

The format itself is `adapterhub.runtime.quant.nf4.NF4Weight` (semantics, shapes and speed notes in
runtime/quant/fourbit.py); these are the bitsandbytes-style entry points:
`quantize(w, blocksize=64, double_quant=True) -> NF4Weight`, `dequantize(q_or_state_dict, dtype=None)`,
`dequantize_into(q, out)`, and `NF4Weight.from_state_dict(sd, prefix)` / `.state_dict(prefix)` with a
module prefix ("" or e.g. "model.layers.0.mlp.up_proj.").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapterhub.runtime.quant.bnb_state import single_prefix
from adapterhub.runtime.quant.nf4 import NF4Weight
from adapterhub.runtime.quant.tables import BLOCKSIZES

__all__ = ["BLOCKSIZES", "NF4Weight", "dequantize", "dequantize_into", "quantize"]


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """As bitsandbytes' `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)`."""
    return NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)


def dequantize(q_or_state_dict: NF4Weight | Mapping, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An NF4Weight, or a state dict holding exactly one `<module>weight.quant_state.bitsandbytes__nf4`,
    -> the weight of its original shape in `dtype` (default: the original dtype)."""
    q = q_or_state_dict
    if isinstance(q, Mapping):
        q = NF4Weight.from_state_dict(q, single_prefix(q).removesuffix("weight"))
    return q.dequantize(dtype)


def dequantize_into(q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """out[j] = dtype(float32(NF4_CODE[code_j] * absmax[j // G])), round to nearest even; returns out."""
    return q.dequantize_into(out)
