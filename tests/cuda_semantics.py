"""The Semantics blocks of runtime/kernels.py written out literally, for the CUDA op tests.

The twins' CPU paths may take documented shortcuts (e.g. one extra rounding); the CUDA kernels mirror
the Semantics exactly, so tests that check bit-level agreement compare with these.
"""

from __future__ import annotations

import torch

from reference.nf4 import NF4_CODE


def dequantize_semantics(packed, absmax, blocksize, numel):
    """SEMANTICS §1.4-1.5 written out with reference/nf4.py's table: high nibble first, fp32 product (n,)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1).long()  # (n,)
    return torch.from_numpy(NF4_CODE)[codes] * absmax.repeat_interleave(blocksize)[:numel]


def expand_semantics(y, h, B_stack, ids, scaling, dora_scale):
    """kernels.lora_expand's Semantics block, literally (its CPU path may round once more, as it documents)."""
    n = ids.repeat_interleave(y.shape[1])  # (B*T,) slot per row
    hs = (h.reshape(-1, h.shape[-1]).float() * scaling[n, None]).to(y.dtype)  # (B*T, R)
    u = torch.einsum("mr,mro->mo", hs.float(), B_stack[n].float())  # (B*T, Dout) fp32
    v = (y.reshape(-1, y.shape[-1]).float() + u).to(y.dtype)
    if dora_scale is not None:
        v = (v.float() * dora_scale[n].float()).to(y.dtype)
    return v.view_as(y)
