"""`Codebook`: the values of a blockwise format and how a scaled value picks its code, exactly and fast.

A value's sorted position is the number of `thresholds` strictly below s (so a value on a threshold takes
the lower position), and its code is `order[position]` (the identity when the values are stored sorted):
for NF4 the thresholds are bitsandbytes' float32 midpoints (semantics §1.2); FP4 stores its values
sign-magnitude, so they are sorted first (§11); for the double-quant map the thresholds are the exact
midpoints rounded down, which picks the exact nearest entry, ties lower (§2.3).

How codes are picked fast (exact, no float64, no Python loop over elements): the float32 bit patterns
of s are cut into buckets by their top bits, each bucket holding at most one threshold (checked when
the table is built). Within a bucket a key (the bits, all flipped for negative values) grows with s,
and one int32 table F gives code = (key - F[bucket]) >> 24: F puts the bucket's lowest code in bits
24.. and its threshold's key in the bits below, so the subtraction borrows exactly when key <= the
threshold's key.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

if sys.byteorder != "little":
    raise ImportError("adapterhub.runtime.kernels packs codes through int16 views: little-endian machines only")

_CODE_BIT = 24  # codes live in bits 24.. of the coder's int32 results
# 0-d integer operands: a Python int would be wrapped into a new tensor on every call (~3 us each)
_INT = {k: torch.tensor(k, dtype=torch.int32) for k in range(32)}


@dataclass(frozen=True, eq=False)
class Codebook:
    """A format's code values (index = code) and the thresholds between them, as the ops take it."""

    name: str  # "nf4" | "fp4" | "dynamic8": subclasses of Ops have compiled kernels for some names
    values: torch.Tensor  # (K,) float32 by code, K = 16 for 4-bit formats, 256 for the double-quant map
    thresholds: torch.Tensor  # (K-1,) float32 ascending: position(s) = #{t : t < s}
    shift: int  # bucket size 2**shift bit patterns: the largest that puts at most one threshold per bucket
    order: torch.Tensor | None = None  # (K,) int32: position -> code; None when `values` is sorted

    @classmethod
    def by_midpoints(cls, name: str, values: torch.Tensor, shift: int) -> Codebook:
        """bitsandbytes' rule for 4-bit codes: the float32 midpoints of the sorted values, a value on one going
        to the lower (more negative) entry (§1.2, §11); equal values keep their code order (a stable sort)."""
        order = torch.sort(values, stable=True).indices
        ranked = values[order]
        is_sorted = bool(torch.equal(order, torch.arange(values.numel())))
        return cls(name, values, (ranked[:-1] + ranked[1:]) / 2, shift, None if is_sorted else order.int())

    @classmethod
    def exact_nearest(cls, name: str, values: torch.Tensor, shift: int) -> Codebook:
        """The exact nearest value, ties lower: midpoints computed in float64, rounded down to float32 (§2.3)."""
        mid = (values[:-1].double() + values[1:].double()) / 2
        t = mid.float()
        return cls(name, values, torch.where(t.double() > mid, torch.nextafter(t, torch.tensor(-torch.inf)), t), shift)

    @property
    def byte_pairs(self) -> torch.Tensor:
        """4-bit formats: (256,) int64, byte -> (values[byte >> 4], values[byte & 15]) as two float32."""
        return torch.stack([self.values.repeat_interleave(16), self.values.repeat(16)], dim=1).view(torch.int64).view(256)

    @functools.cached_property
    def coder(self) -> Coder:
        return Coder.build(self.thresholds, self.shift)


@dataclass(frozen=True)
class Coder:
    """code(s) = number of `thresholds` strictly below s, as one table lookup (module docstring)."""

    shift: int  # a bucket is a run of 2 ** shift bit patterns
    table: torch.Tensor  # int32 (2 ** (32 - shift),), indexed by (bits >> shift) + 2 ** (31 - shift)
    half: torch.Tensor  # int32 0-d, 2 ** (31 - shift): the bucket index offset

    @classmethod
    def build(cls, thresholds: torch.Tensor, shift: int) -> Coder:
        half = 1 << (31 - shift)
        first = torch.arange(-half, half, dtype=torch.int64) << shift  # first bit pattern of each bucket
        ends = torch.stack([first, first + (1 << shift) - 1])  # (2, buckets) int64
        values = _wrap_int32(ends).view(torch.float32)
        values = torch.where(values.isnan(), torch.where(ends < 0, -torch.inf, torch.inf), values)  # NaN: past inf
        lowest, highest = values.aminmax(dim=0)
        base = torch.searchsorted(thresholds, lowest)  # code of the bucket's lowest value
        inside = torch.searchsorted(thresholds, highest) - base
        if int(inside.max()) > 1:
            raise AssertionError(f"two thresholds share a bucket at shift {shift}; use a smaller shift")
        key_low = _key(ends).amin(dim=0)  # keys grow with the value inside a bucket
        key_threshold = _key(thresholds.view(torch.int32).to(torch.int64))[base.clamp(max=thresholds.numel() - 1)]
        # with a threshold: code = base + [key > key_threshold]; without: code = base
        with_threshold = key_threshold + 1 - ((base + 1) << _CODE_BIT)
        table = torch.where(inside == 1, with_threshold, key_low - (base << _CODE_BIT))
        return cls(shift, _wrap_int32(table), torch.tensor(half, dtype=torch.int32))

    def codes(self, s: torch.Tensor, key: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s float32 (m,) -> int32 codes (m,) in out; indices >= 128 wrap negative: read them as uint8.
        key (m,) int32 is scratch; s is overwritten."""
        bits = s.view(torch.int32)
        torch.bitwise_right_shift(bits, _INT[31], out=key)
        key.bitwise_xor_(bits)  # the key: bits, all bits flipped for negative values
        torch.bitwise_right_shift(bits, _INT[self.shift], out=out).add_(self.half)
        torch.index_select(self.table.to(s.device), 0, out, out=bits)
        return torch.sub(key, bits, out=out).bitwise_right_shift_(_INT[_CODE_BIT])


def _wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2**32: the table's subtraction wraps the same way."""
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _key(bits: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns (any int dtype) -> keys: all bits flipped for negative values, so that keys
    grow with the value within a bucket of one sign. Both signs share keys, buckets come from bits."""
    bits = _wrap_int32(bits).to(torch.int64)
    return torch.where(bits < 0, -bits - 1, bits)
