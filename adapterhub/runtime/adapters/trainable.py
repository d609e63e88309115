"""One trainable adapter on an `AdapterLinear`: PEFT's LoRA / DoRA forward with autograd, for training.

Serving stacks adapters per slot and precomputes DoRA's scale (adapters/linear.py); training needs the
opposite: one adapter whose A, B (and magnitude) are `nn.Parameter`s, and DoRA's norm recomputed from
the current A and B at every call. While a layer holds a `TrainableAdapter` (`AdapterLinear.trainable`)
its forward is this module's, for every row; the frozen base weight is reached only through
`BaseWeight.matmul` (differentiable in x for every format) and `dequantize` (DoRA's norm).

Semantics (semantics §4.1, §5.3), s = scaling, x_d = dropout(x), W the dequantized base weight:
    LoRA:  y = W x + b + s * B A x_d
    DoRA:  g = m / ||W + s B A||_row, detached in the norm (DoRA paper, Sec. 4.3: the norm is a constant
           for the gradient);  y = W x + b + (g - 1) * (W x_d) + g * s * B A x_d
           (without dropout x_d = x and W x_d is W x itself: y = b + g * (W x + s B A x)).
The parameters are float32 (PEFT keeps adapters in fp32); the matmuls run in the activations' dtype,
so a bf16 base trains with bf16 GEMMs and the fp32 parameters receive the gradients. The scaling is
folded into B (s B, float32, then rounded to the activations' dtype) rather than applied to the output:
the same value up to one rounding (bit-equal when s is a power of two, as lora_alpha = 2 r gives).

DoRA's norm is not taken on a materialised W + s B A (two (Dout, Din) temporaries per layer and call, and a
dequantized copy of a 4-bit W); it is expanded per row i:
    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s sum_r B_ir (A W^T)_ri + s^2 sum_r,r' B_ir (A A^T)_rr' B_ir'
||W||^2_row is computed once (W is frozen), A W^T is the base layer applied to the R rows of A (the fused
4-bit matmul on an NF4 base), and the rest is (Dout, R) work. In fp32 it agrees with the direct norm to
about 1e-7 relative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.quant.weight import BaseWeight


class TrainableAdapter(nn.Module):
    """lora_A (R, Din), lora_B (Dout, R), lora_magnitude_vector (Dout,) for DoRA, all float32 Parameters."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor | None = None, dropout: float = 0.0, weight: BaseWeight | None = None,
                 dtype: torch.dtype = torch.float32):
        """DoRA (`magnitude` given) needs the base `weight` and the layer's compute `dtype` for ||W||_row."""
        super().__init__()
        self.lora_A = nn.Parameter(lora_A.detach().float().clone())
        self.lora_B = nn.Parameter(lora_B.detach().float().clone())
        self.lora_magnitude_vector = None if magnitude is None else nn.Parameter(magnitude.detach().float().clone())
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("weight_norm_sq", None, persistent=False)  # (Dout,) float32 ||W||^2_row, DoRA only
        if magnitude is not None:
            if weight is None:
                raise ValueError("a DoRA TrainableAdapter needs the base weight for its norm")
            W = weight.dequantize(dtype).float()  # (Dout, Din): the W the forward multiplies by
            self.weight_norm_sq = W.pow(2).sum(1)

    @property
    def is_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def forward(self, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, Din) -> (B, T, Dout) in x.dtype."""
        A = self.lora_A.to(x.dtype)
        # s B as one (Dout, R) matrix: no pass over the (B, T, Dout) output to scale it, forward or backward
        sB = (self.lora_B * self.scaling).to(x.dtype)
        x_d = self.dropout(x)
        lora = F.linear(F.linear(x_d, A), sB)  # (B, T, Dout)
        if not self.is_dora:
            # in place on the base output (the frozen matmul keeps its input, not its output, for backward)
            return weight.matmul(x, bias).add_(lora)
        g = self.lora_magnitude_vector.to(x.dtype) / self.weight_norm(weight, A).to(x.dtype)  # (Dout,)
        base = weight.matmul(x, None)  # (B, T, Dout)
        if isinstance(self.dropout, nn.Identity):
            y = g * base.add_(lora)
        else:  # PEFT recomputes W x_d without bias for the DoRA term (semantics §5.3)
            y = base + (g - 1) * weight.matmul(x_d, None) + g * lora
        return y if bias is None else y + bias

    @torch.no_grad()
    def weight_norm(self, weight: BaseWeight, A: torch.Tensor) -> torch.Tensor:
        """||W + s B A||_row (Dout,) float32, detached (see the module docstring for the expansion)."""
        s, B, A32 = self.scaling, self.lora_B, self.lora_A
        AW = weight.matmul(A, None).float()  # (R, Dout) = A W^T, in the compute dtype
        cross = (B * AW.T).sum(1)  # (Dout,)
        quadratic = ((B @ (A32 @ A32.T)) * B).sum(1)  # (Dout,)
        return (self.weight_norm_sq + 2 * s * cross + s * s * quadratic).clamp_min(0).sqrt()
