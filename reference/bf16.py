"""bfloat16 in NumPy (which has no bf16 dtype): bf16 values are carried as float32 arrays whose
low 16 bits are zero, or as their uint16 bit patterns.

Rounding is IEEE round-to-nearest-even, as torch's ``.to(torch.bfloat16)`` does; NaN stays NaN.
"""

import numpy as np


def to_bits(x):
    """float32 array -> uint16 bf16 bit patterns, rounded to nearest even.  # (...) -> (...)"""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding_bias = ((u >> 16) & 1) + np.uint32(0x7FFF)
    bits = ((u + rounding_bias) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), bits)


def from_bits(bits):
    """uint16 bf16 bit patterns -> float32 array (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x):
    """float32 -> float32 holding the nearest bf16 value (what ``x.to(bf16).float()`` gives)."""
    return from_bits(to_bits(x))
