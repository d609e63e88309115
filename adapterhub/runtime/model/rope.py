"""Rotary position embeddings as transformers computes them: inverse frequencies in float32 (with "llama3" or
"linear" scaling), angles in float32, cos / sin rounded to the compute dtype, rotate-half application."""

from __future__ import annotations

import torch

from adapterhub.runtime.model.config import RopeScaling


def rope_inv_freq(theta: float, head_dim: int, scaling: RopeScaling | None = None) -> torch.Tensor:
    """(Dh/2,) float32 inverse frequencies 1 / theta^(2i / Dh), scaled when configured."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / scaling.factor
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    s = scaling
    wavelen = 2 * torch.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    old_len = s.original_max_position_embeddings
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, Dh) in `dtype`, computed in float32 as HF does.  # positions (B, T)"""
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE.  # (B, h, T, Dh), (B, 1, T, Dh) -> (B, h, T, Dh)"""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
