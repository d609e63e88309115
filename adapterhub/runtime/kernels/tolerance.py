"""How far a fast path may be from its torch twin (kernels/ops.py), per compute dtype: the one table.

IMPLEMENTATIONS: |y_fast - y_torch| <= atol + rtol * |y_torch| elementwise, for two implementations of
one op (CUDA vs torch, compiled CPU LoRA vs torch): fp32 sums in another order, and in bf16 / fp16 one
output rounding either way.
FUSED_LINEAR: |y_fused - y_torch| <= FUSED_LINEAR[dtype] * (|x| @ |W|^T) elementwise, for a fused 4-bit
linear against dequantize + F.linear: the weight is the same, the fp32 sums run in another order, and a
bf16 output may round once more (2^-8 relative).
"""

from __future__ import annotations

import torch

IMPLEMENTATIONS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
FUSED_LINEAR = {torch.float32: 1e-5, torch.bfloat16: 2**-8}
