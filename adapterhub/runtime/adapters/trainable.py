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

Without dropout (the default, as PEFT's) the whole layer is one autograd node (`_AdapterLinear`) with its
backward written out: composed of torch ops, each layer and step would make three more (tokens, Dout)
passes (the adapter's output, its sum with the base output, DoRA's g * out) and autograd would sum the
base's and the adapter's gradients of x in one more (tokens, Din) pass; DoRA would also keep both out and
g * out for the backward pass. Here the GEMMs accumulate into their outputs (addmm_) and g scales in place.
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
        if isinstance(self.dropout, nn.Identity):
            return _AdapterLinear.apply(x, self.lora_A, self.lora_B, self.lora_magnitude_vector, self, weight, bias)
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
        # the cross and quadratic terms as one row-wise dot product: sum_r B_ir (2 s (A W^T)_ri + s^2 (B A A^T)_ir)
        terms = torch.addmm(AW.T, B, A32 @ A32.T, beta=2 * s, alpha=s * s)  # (Dout, R)
        return torch.linalg.vecdot(B, terms).add_(self.weight_norm_sq).clamp_min_(0).sqrt_()


class _AdapterLinear(torch.autograd.Function):
    """y = W x + b + s B A x (LoRA) or b + g * (W x + s B A x) (DoRA), no dropout, as one autograd node.

    The same products and roundings as the composed ops (A and s B cast to x's dtype, their gradients cast
    back to float32 and s applied in float32), without the composition's passes over (tokens, D) tensors:
    the adapter's output is accumulated into the base output by the GEMM (addmm_), DoRA's g scales it in
    place, and the adapter's share of the gradient of x is accumulated into the base's by the GEMM. Saved:
    x, A x (tokens, R) and, for DoRA, the output before the bias (the gradient of g needs W x + s B A x).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, adapter: TrainableAdapter, weight: BaseWeight, bias):
        dtype, Din = x.dtype, x.shape[-1]
        A, sB = lora_A.to(dtype), (lora_B * adapter.scaling).to(dtype)
        x2 = x.reshape(-1, Din)
        h = torch.mm(x2, A.T)  # (N, R)
        is_dora = magnitude is not None
        y = weight.matmul(x, None if is_dora else bias)  # (..., Dout), a new tensor: the frozen base
        y2 = y.view(-1, y.shape[-1])
        y2.addmm_(h, sB.T)  # + s B A x
        g = norm = kept = None
        if is_dora:
            norm = adapter.weight_norm(weight, A).to(dtype)  # (Dout,) ||W + s B A||_row, a constant
            g = magnitude.to(dtype) / norm
            # g * out is kept and divided by g in the backward pass (no second (tokens, Dout) tensor), unless
            # some g is 0: then out itself
            ctx.kept_is_scaled = bool((g != 0).all())
            if ctx.kept_is_scaled:
                kept = y = y.mul_(g)
            else:
                kept, y = y, y * g
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(x, h, A, sB, g, norm, kept)
        ctx.weight, ctx.scaling = weight, adapter.scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, A, sB, g, norm, kept = ctx.saved_tensors
        Dout = grad_y.shape[-1]
        gz = grad_y.reshape(-1, Dout)  # becomes the gradient at W x + s B A x
        grad_m = None
        if g is not None:
            product = gz * kept.view(-1, Dout)
            if ctx.needs_input_grad[3]:  # d/dg = sum over tokens of grad_y * (W x + s B A x); g = m / norm
                dg = product.sum(0)  # (Dout,) in the activations' dtype, as autograd's sum of a product
                grad_m = ((dg / g if ctx.kept_is_scaled else dg) / norm).float()
            gz = torch.mul(gz, g, out=product)  # the product's buffer reused
        grad_h = torch.mm(gz, sB)  # (N, R)
        grad_x = None
        if ctx.needs_input_grad[0]:
            W = ctx.weight.dequantize(gz.dtype)  # (Dout, Din); may alias a dense weight: only read
            grad_x = torch.mm(gz, W).addmm_(grad_h, A).view(x.shape)
        grad_A = torch.mm(grad_h.T, x.reshape(-1, x.shape[-1])).float() if ctx.needs_input_grad[1] else None
        grad_B = torch.mm(gz.T, h).float() * ctx.scaling if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, grad_m, None, None, None
