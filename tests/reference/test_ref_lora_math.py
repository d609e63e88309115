"""runtime/lora_math (torch) against reference/lora.py (NumPy), and against the formulas written out by hand."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from adapterhub.errors import MergeError  # noqa: E402
from adapterhub.runtime.adapters import lora_math  # noqa: E402
from reference import lora as ref  # noqa: E402

S = 1.75  # alpha / r of a typical adapter, not a power of two


def tensors(dout=24, din=40, r=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(dout, din, generator=g) * 0.3).to(dtype)
    A = torch.randn(r, din, generator=g) * 0.2
    B = torch.randn(dout, r, generator=g) * 0.2
    m = torch.rand(dout, generator=g) + 0.5
    return W, A, B, m


def dyadic(shape, seed):
    """Multiples of 1/512: products and short sums are exact in float32, so rounding can be compared bit for bit."""
    return torch.randint(-64, 65, shape, generator=torch.Generator().manual_seed(seed)).float() / 512


def test_delta_weight_fp32_and_fan_in_fan_out():
    W, A, B, _ = tensors()
    want = ref.delta_weight(A.numpy(), B.numpy(), S)
    np.testing.assert_allclose(lora_math.delta_weight(A, B, S).numpy(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lora_math.delta_weight(A, B, S, fan_in_fan_out=True).numpy(), want.T, rtol=1e-6, atol=1e-7)


def test_delta_weight_half_adapters_compute_in_fp32_then_round():
    A, B = dyadic((6, 40), 1).bfloat16(), dyadic((24, 6), 2).bfloat16()
    got = lora_math.delta_weight(A, B, S)
    assert got.dtype == torch.bfloat16
    want = ref.ROUND["bfloat16"](ref.delta_weight(A.float().numpy(), B.float().numpy(), S))
    np.testing.assert_array_equal(got.float().numpy(), want)


def test_dora_norm_and_scale_match_the_written_out_formula():
    W, A, B, m = tensors()
    V = W.double().numpy() + S * (B.double().numpy() @ A.double().numpy())
    norm = np.sqrt((V**2).sum(axis=1))  # per output row, no epsilon (§5.2)
    np.testing.assert_allclose(ref.dora_weight_norm(W.numpy(), A.numpy(), B.numpy(), S), norm, rtol=1e-12)
    np.testing.assert_allclose(lora_math.dora_weight_norm(W, A, B, S).numpy(), norm, rtol=1e-6)
    scale = lora_math.dora_scale(W, A, B, S, m)
    assert scale.dtype == torch.float32 and np.abs(scale.numpy() - 1).max() > 0.1
    np.testing.assert_allclose(scale.numpy(), m.numpy() / norm, rtol=1e-6)


def test_dora_forward_from_scale_equals_reference_and_direct_formula():
    W, A, B, m = tensors()
    x = torch.randn(3, 7, 40)
    g = lora_math.dora_scale(W, A, B, S, m)
    y = g * (x @ W.T + S * (x @ A.T) @ B.T)  # the runtime's form: scale the LoRA output per row
    direct = (m.double() / torch.linalg.norm(W.double() + S * B.double() @ A.double(), dim=1)) * (
        x.double() @ (W.double() + S * B.double() @ A.double()).T
    )  # DoRA paper eq. 5 at inference: m * V / ||V||_c applied to x
    want = ref.dora_forward(x.numpy(), W.numpy(), None, A.numpy(), B.numpy(), S, m.numpy())
    np.testing.assert_allclose(want, direct.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y.numpy(), want, atol=1e-5)
    assert np.abs(want - ref.lora_forward(x.numpy(), W.numpy(), None, A.numpy(), B.numpy(), S)).max() > 0.1


def test_merge_equals_unmerged_forward_fp32():
    W, A, B, m = tensors()
    x = torch.randn(5, 40)
    merged = lora_math.merge_lora(W, A, B, S)
    want = ref.lora_forward(x.numpy(), W.numpy(), None, A.numpy(), B.numpy(), S)
    assert np.abs(want - (x @ W.T).numpy()).max() > 0.1
    np.testing.assert_allclose((x @ merged.T).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(lora_math.unmerge_lora(merged, A, B, S).numpy(), W.numpy(), atol=1e-6)
    merged_d, norm = lora_math.merge_dora(W, A, B, S, m)
    want_d = ref.dora_forward(x.numpy(), W.numpy(), None, A.numpy(), B.numpy(), S, m.numpy())
    np.testing.assert_allclose((x @ merged_d.T).numpy(), want_d, atol=1e-5)
    np.testing.assert_allclose(lora_math.unmerge_dora(merged_d, A, B, S, m, norm).numpy(), W.numpy(), atol=1e-6)


@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_bf16_bit_exact_against_reference(safe):
    W = (torch.randn(24, 40, generator=torch.Generator().manual_seed(3)) * 0.3).bfloat16()
    A, B = dyadic((6, 40), 1), dyadic((24, 6), 2)
    Wn, An, Bn = W.float().numpy(), A.numpy(), B.numpy()
    merged = lora_math.merge_lora(W, A, B, S, safe=safe)
    assert merged.dtype == torch.bfloat16
    want = ref.merge_lora(Wn, An, Bn, S, dtype="bfloat16", safe=safe)
    np.testing.assert_array_equal(merged.float().numpy(), want)
    np.testing.assert_array_equal(
        lora_math.unmerge_lora(merged, A, B, S).float().numpy(), ref.unmerge_lora(want, An, Bn, S, dtype="bfloat16")
    )
    other = ref.merge_lora(Wn, An, Bn, S, dtype="bfloat16", safe=not safe)
    assert (want != other).mean() > 0.05  # §4.4: one rounding vs two


def test_dora_merge_bf16_within_one_rounding_of_reference():
    W, A, B, m = tensors(dtype=torch.bfloat16)
    merged, norm = lora_math.merge_dora(W, A, B, S, m)
    want, n = ref.merge_dora(W.float().numpy(), A.numpy(), B.numpy(), S, m.numpy(), dtype="bfloat16")
    np.testing.assert_allclose(norm.numpy(), n, rtol=1e-6)
    np.testing.assert_allclose(merged.float().numpy(), want, rtol=2.0**-7)
    assert (merged.float().numpy() == want).mean() > 0.95
    back = lora_math.unmerge_dora(merged, A, B, S, m, norm)
    np.testing.assert_allclose(back.float().numpy(), W.float().numpy(), rtol=2.0**-6, atol=2.0**-10)


def test_safe_merge_refuses_non_finite_results():
    W, A, B, m = tensors()
    B[3, 0] = float("inf")
    assert not torch.isfinite(lora_math.merge_lora(W, A, B, S)).all()  # unsafe merge lets it through, as PEFT does
    with pytest.raises(MergeError, match="non-finite"):
        lora_math.merge_lora(W, A, B, S, safe=True)
    with pytest.raises(MergeError, match="DoRA"):
        lora_math.merge_dora(W, A, B, S, m, safe=True)


@settings(max_examples=25, deadline=None)
@given(
    dout=st.integers(1, 33), din=st.integers(1, 33), r=st.integers(1, 8),
    s=st.floats(0.01, 8.0), seed=st.integers(0, 2**16),
)
def test_property_torch_matches_reference_on_random_shapes(dout, din, r, s, seed):
    W, A, B, m = tensors(dout, din, r, seed)
    Wn, An, Bn, mn = W.numpy(), A.numpy(), B.numpy(), m.numpy()
    np.testing.assert_allclose(lora_math.delta_weight(A, B, s).numpy(), ref.delta_weight(An, Bn, s), rtol=1e-5, atol=1e-6)
    # W + s·B·A can cancel (din=1 makes a row one element), so relative error is unbounded there: the
    # float32 norm is only good to ~eps × the magnitude of its terms (all O(1) here), hence the atol.
    np.testing.assert_allclose(lora_math.dora_weight_norm(W, A, B, s).numpy(), ref.dora_weight_norm(Wn, An, Bn, s),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lora_math.merge_lora(W, A, B, s).numpy(), ref.merge_lora(Wn, An, Bn, s), rtol=1e-5, atol=1e-6)
    merged, norm = lora_math.merge_dora(W, A, B, s, m)
    want, n = ref.merge_dora(Wn, An, Bn, s, mn)
    np.testing.assert_allclose(merged.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lora_math.unmerge_dora(merged, A, B, s, m, norm).numpy(), Wn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dout,din,r,s", [(64, 48, 8, 2.0), (5, 300, 1, -0.5), (256, 128, 64, 0.125)])
def test_delta_norm_from_the_rank_r_factors_equals_the_norm_of_the_formed_delta(dout, din, r, s):
    g = torch.Generator().manual_seed(dout + r)
    A, B = torch.randn(r, din, generator=g), torch.randn(dout, r, generator=g)
    formed = torch.linalg.norm((B.double() @ A.double()) * s)
    assert lora_math.delta_norm(A, B, s) == pytest.approx(float(formed), rel=1e-9)
    assert lora_math.delta_norm(A, torch.zeros_like(B), s) == 0.0
