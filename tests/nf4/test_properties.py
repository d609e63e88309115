"""Hypothesis properties of NF4 quantization (torch and reference)."""

import numpy as np
import torch
from hypothesis import assume, example, given, settings
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
    normal = absmax >= 1e-38  # below it bnb divides by the clamped 1e-38 (§1.2): codes shrink towards 7
    assert np.all(err[normal] <= HALF_GAP * absmax[normal] * (1 + 1e-6))
    assert np.all(err[~normal] <= absmax[~normal])


@SETTINGS
@given(WEIGHTS, BLOCKSIZES)
def test_requantizing_the_dequantized_weight_keeps_the_state(w, blocksize):
    """A dequantized block holds +-its absmax exactly, and code * a * (1/a) stays far from every
    midpoint, so quantize(dequantize(q)) is q again. (Not with double quantization: a decoded absmax
    may be far from the block's max, even negative, when blocks differ by orders of magnitude.)
    Blocks whose absmax is below 1e-38 are left out: bnb divides by the clamped absmax (§1.2), so such a
    block's codes shrink towards 7 at every round trip (1.6e-39 codes 9, its 2.6e-40 decode codes 7)."""
    q = nf4.quantize(torch.from_numpy(w), blocksize=blocksize, double_quant=False)
    assume(bool(torch.all((q.absmax == 0) | (q.absmax >= 1e-38))))
    again = nf4.quantize(nf4.dequantize(q), blocksize=blocksize, double_quant=False)
    assert torch.equal(again.packed, q.packed)
    assert torch.equal(again.absmax, q.absmax)


def test_a_block_below_the_clamp_drifts_to_zero_on_requantization():
    """The surprise the property above leaves out, pinned down: absmax < 1e-38 divides by 1e-38."""
    q = nf4.quantize(torch.tensor([1.609562e-39]), blocksize=32, double_quant=False)
    again = nf4.quantize(nf4.dequantize(q), blocksize=32, double_quant=False)
    assert q.packed.item() == 0x97 and again.packed.item() == 0x77  # code 9 (s = 0.16), then code 7 (0)


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1024, 1024, width=32)), st.integers(-20, 20))
@example(np.array([3.0634e-41], dtype=np.float32), 9)  # a subnormal block under the clamp, scaled above it
def test_power_of_two_scaling_keeps_codes(w, k):
    """x * 2**k is exact, and so is its reciprocal absmax: the codes cannot change, where both absmax are away
    from the 1e-38 clamp (a block under it divides by 1e-38, not by its absmax) and no scaled value lost bits
    to a subnormal."""
    scaled = (w.astype(np.float64) * 2.0**k).astype(np.float32)
    base = R.quantize(w, 64, double_quant=False)
    other = R.quantize(scaled, 64, double_quant=False)
    absmax = base["weight.absmax"]
    is_exact = np.array_equal(scaled.astype(np.float64) / 2.0**k, w.astype(np.float64))
    if is_exact and np.all(np.minimum(absmax, absmax * np.float32(2.0**k)) >= 1e-38):
        assert np.array_equal(other["weight"], base["weight"])
        assert np.array_equal(other["weight.absmax"], base["weight.absmax"] * np.float32(2.0**k))
