"""The torch twins of the CUDA ops (kernels/ops.py on the CPU), and their Semantics blocks written out literally.

The twins may take documented shortcuts (e.g. one extra rounding); the CUDA kernels mirror the Semantics
exactly, so tests that check bit-level agreement compare with the literal versions below.
"""

from __future__ import annotations

import torch

from adapterhub.runtime.kernels import Ops
from adapterhub.runtime.quant.nf4 import NF4
from reference.nf4 import NF4_CODE


class Twin:
    """The CUDA ops' names and arguments (cuda/README.md), computed by the torch `Ops` on the CPU."""

    def __init__(self):
        self.ops = Ops(torch.device("cpu"))

    def nf4_dequantize(self, packed, absmax, blocksize, out):
        return self.ops.dequantize_4bit(packed, absmax, NF4, blocksize, out)

    def nf4_linear(self, x, packed, absmax, blocksize, out_features, in_features):
        return self.ops.linear_4bit(x, packed, absmax, NF4, blocksize, out_features, in_features)

    def lora_shrink(self, x, A_stack, ids):
        return self.ops.lora_shrink(x, A_stack, ids)

    def lora_expand(self, y, h, B_stack, ids, scaling, dora_scale=None):
        return self.ops.lora_expand(y, h, B_stack, ids, scaling, dora_scale)


twin = Twin()


def dequantize_semantics(packed, absmax, blocksize, numel):
    """semantics §1.4-1.5 written out with reference/nf4.py's table: high nibble first, fp32 product (n,)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1).long()  # (n,)
    return torch.from_numpy(NF4_CODE)[codes] * absmax.repeat_interleave(blocksize)[:numel]


def expand_semantics(y, h, B_stack, ids, scaling, dora_scale):
    """Ops.lora_expand's Semantics block, literally (its CPU path may round once more, as it documents)."""
    n = ids.repeat_interleave(y.shape[1])  # (B*T,) slot per row
    hs = (h.reshape(-1, h.shape[-1]).float() * scaling[n, None]).to(y.dtype)  # (B*T, R)
    u = torch.einsum("mr,mro->mo", hs.float(), B_stack[n].float())  # (B*T, Dout) fp32
    v = (y.reshape(-1, y.shape[-1]).float() + u).to(y.dtype)
    if dora_scale is not None:
        v = (v.float() * dora_scale[n].float()).to(y.dtype)
    return v.view_as(y)
