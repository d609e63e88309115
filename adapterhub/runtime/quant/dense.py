"""`DenseWeight`: an unquantized base weight, kept in the compute dtype (the `BaseWeight` protocol)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from adapterhub.errors import ModelLoadError
from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Ops


@dataclass(frozen=True, eq=False)
class DenseWeight:
    format: ClassVar[str] = "dense"
    is_quantized: ClassVar[bool] = False
    tensor: torch.Tensor  # (Dout, Din), contiguous, requires_grad False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @functools.cached_property
    def ops(self) -> Ops:
        return kernels.ops_for(self.device)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.linear(x, self.tensor, bias)  # (..., Din) -> (..., Dout): F.linear, bucketed GEMM rows

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensor if dtype in (None, self.tensor.dtype) else self.tensor.to(dtype)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + "weight": self.tensor}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", *, dtype: torch.dtype) -> DenseWeight:
        if prefix + "weight" not in sd:
            raise ModelLoadError(f"checkpoint lacks tensor {prefix + 'weight'!r}")
        return cls.quantize(sd[prefix + "weight"], dtype=dtype)

    @classmethod
    def quantize(cls, W: torch.Tensor, *, dtype: torch.dtype) -> DenseWeight:
        return cls(W.detach().to(dtype=dtype).contiguous())

    def replaced_by(self, W: torch.Tensor) -> DenseWeight:
        if tuple(W.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(W.shape)} != (out, in) = {self.shape}")
        return DenseWeight(W.detach().to(device=self.device, dtype=self.tensor.dtype).contiguous())
