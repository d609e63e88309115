"""Hypothesis properties of NF4 quantization (torch and reference)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adapterhub import nf4
from reference import nf4 as R

FLOATS = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)
WEIGHTS = hnp.arrays(np.float32, st.integers(1, 700), elements=st.one_of(FLOATS, st.just(0.0), st.floats(-1, 1, width=32)))
BLOCKSIZES = st.sampled_from([32, 64, 128, 256])
HALF_GAP = float(np.diff(R.NF4_CODE.astype(np.float64)).max() / 2)  # the widest NF4 gap is -1 .. code 1

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(WEIGHTS, BLOCKSIZES, st.booleans())
def test_torch_equals_reference_on_arbitrary_floats(w, blocksize, double_quant):
    q = nf4.quantize(torch.from_numpy(w), blocksize=blocksize, double_quant=double_quant)
    ref = R.quantize(w, blocksize, double_quant, offset=q.offset.item() if double_quant else None)
    for key, value in q.state_dict().items():
        assert np.array_equal(value.numpy(), ref[key]), key
    assert np.array_equal(nf4.dequantize(q).numpy(), R.dequantize(ref))


@SETTINGS
@given(WEIGHTS, BLOCKSIZES)
def test_round_trip_error_is_at_most_half_a_code_gap(w, blocksize):
    q = nf4.quantize(torch.from_numpy(w), blocksize=blocksize, double_quant=False)
    absmax = np.repeat(q.absmax.numpy().astype(np.float64), blocksize)[: w.size]
    err = np.abs(nf4.dequantize(q).numpy().astype(np.float64) - w)
    normal = absmax >= 1e-38  # below it bnb's clamped divisor (§1.2) sends the whole block to code 7
    assert np.all(err[normal] <= HALF_GAP * absmax[normal] * (1 + 1e-6))
    assert np.all(err[~normal] <= absmax[~normal])


@SETTINGS
@given(WEIGHTS, BLOCKSIZES)
def test_requantizing_the_dequantized_weight_keeps_the_state(w, blocksize):
    """A dequantized block holds +-its absmax exactly, and code * a * (1/a) stays far from every
    midpoint, so quantize(dequantize(q)) is q again. (Not with double quantization: a decoded absmax
    may be far from the block's max, even negative, when blocks differ by orders of magnitude.)"""
    q = nf4.quantize(torch.from_numpy(w), blocksize=blocksize, double_quant=False)
    again = nf4.quantize(nf4.dequantize(q), blocksize=blocksize, double_quant=False)
    assert torch.equal(again.packed, q.packed)
    normal = q.absmax >= 1e-38  # tinier blocks were all coded 7 (clamped divisor, §1.2): they decode to 0
    assert torch.equal(again.absmax[normal], q.absmax[normal]) and torch.all(again.absmax[~normal] == 0)


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1024, 1024, width=32)), st.integers(-20, 20))
def test_power_of_two_scaling_keeps_codes(w, k):
    """x * 2**k is exact, and so is its reciprocal absmax: the codes cannot change."""
    scaled = (w.astype(np.float64) * 2.0**k).astype(np.float32)
    base = R.quantize(w, 64, double_quant=False)
    other = R.quantize(scaled, 64, double_quant=False)
    if np.all(base["weight.absmax"] * np.float32(2.0**k) >= 1e-38):  # away from the 1e-38 clamp
        assert np.array_equal(other["weight"], base["weight"])
        assert np.array_equal(other["weight.absmax"], base["weight.absmax"] * np.float32(2.0**k))
