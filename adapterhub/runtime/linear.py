"""AdapterLinear: a base weight plus stacked per-slot adapters, one batched forward for all rows.

Semantics (per row b with slot n = ids[b]; slot 0 = no adapter: zero A/B, dora_scale 1):
    y[b] = dora_scale[n] * (x[b] W^T + scaling[n] * (x[b] A[n]^T) B[n]^T) + bias
DoRA's scale m / ||W + s B A||_row does not depend on x, so it is precomputed per slot (SEMANTICS §5.3).
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype=torch.bfloat16, device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # Adapter stacks: only slot 0 until a pool installs adapters.
        self.register_buffer("lora_A_stack", torch.zeros(1, 1, in_features, dtype=dtype, device=device))  # (N, R, Din)
        self.register_buffer("lora_B_stack", torch.zeros(1, out_features, 1, dtype=dtype, device=device))  # (N, Dout, R)
        self.register_buffer("scaling", torch.zeros(1, dtype=torch.float32, device=device))  # (N,)
        self.register_buffer("dora_scale", torch.ones(1, out_features, dtype=dtype, device=device))  # (N, Dout)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def load_dense(self, w: torch.Tensor) -> None:
        self.weight.data = w.to(device=self.weight.device, dtype=self.weight.dtype).contiguous()

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.dequantized_weight())  # (B, T, Dout)
        if ids is not None:
            A, Bm = self.lora_A_stack[ids], self.lora_B_stack[ids]  # (B, R, Din), (B, Dout, R)
            s = self.scaling[ids].to(x.dtype)[:, None, None]  # (B, 1, 1)
            h = torch.einsum("btd,brd->btr", x, A)  # (B, T, R)
            y = y + s * torch.einsum("btr,bor->bto", h, Bm)
            y = y * self.dora_scale[ids][:, None, :]
        return y + self.bias if self.bias is not None else y
