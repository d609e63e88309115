"""The compiled CPU LoRA kernels (csrc/lora_cpu.c) against kernels/ops.py's Semantics, written out in fp64.

The kernels sum in fp32 in another order than any torch formulation, so a bf16 result may differ from
the exact value rounded once by one rounding: each element must be within one bf16 ulp of the fp64
result (rounded as the Semantics round), and almost all must equal it. A row's result must not depend
on the rest of the batch (bit for bit), which the torch formulations cannot promise.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.runtime.kernels import Ops, compiled

LIB = compiled.library()
TORCH = Ops("cpu")
pytestmark = pytest.mark.skipif(LIB is None or not LIB.has_lora, reason="compiled CPU LoRA kernels unavailable")

# (B, T, N, R, Din, Dout): register-tile remainders in every dimension (T % 4, T % 16, R % 4, R % 16,
# Din % 32, Dout % 256, Dout % 96, Dout % 32, Dout % 16), more tokens than one work item, decode (T < 16)
# and prefill (T >= 16: AMX tiles, or VDPBF16PS rank / k pairs) paths, at toy and real layer sizes.
SHAPES = [
    (4, 2, 3, 16, 64, 300),  # one-token expand: a full register tile, one 32-column vector, 12 left
    (5, 3, 6, 8, 48, 40),
    (3, 37, 4, 7, 100, 77),
    (2, 1, 3, 1, 32, 16),
    (32, 1, 33, 16, 1024, 2816),
    (4, 64, 5, 16, 2816, 1024),
    (3, 40, 4, 8, 64, 48),  # AMX path (16-token blocks) plus 8 tokens on the AVX-512 path; R padded
    (2, 160, 3, 40, 96, 80),  # two work items per row; ranks over one tile (shrink) and one chunk (expand)
    (1, 16, 2, 64, 1024, 1024),
    (2, 32, 3, 5, 64, 32),  # odd rank on the AMX path
]


def _stacks(B, T, N, R, Din, Dout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, Din, generator=g).bfloat16()
    A = (torch.randn(N, R, Din, generator=g) / Din**0.5).bfloat16()
    BT = torch.randn(N, R, Dout, generator=g).bfloat16()
    ids = torch.randint(0, N, (B,), generator=g)
    scaling = torch.rand(N, generator=g) + 0.5
    dora = torch.rand(N, Dout, generator=g) + 0.5
    y = torch.randn(B, T, Dout, generator=g).bfloat16()
    return x, A, BT, ids, scaling, dora, y


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> None:
    """got (bf16) is exact (fp64) rounded to bf16, or a neighbour of it; and mostly the former."""
    rounded = exact.to(torch.bfloat16)
    ulp = rounded.float().abs().clamp_min(2.0**-126) * 2.0**-7  # one bf16 ulp at rounded's binade, or above
    diff = (got.float() - rounded.float()).abs()
    assert (diff <= ulp).all(), f"max |got - exact| = {diff.max()} beyond one bf16 ulp"
    assert (diff == 0).float().mean() > 0.97, f"only {(diff == 0).float().mean():.3f} of elements equal the exact rounding"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shrink_is_the_exact_product_rounded_once(shape):
    x, A, _, ids, *_ = _stacks(*shape)
    h = LIB.lora_shrink(x, A, ids)
    exact = torch.einsum("btk,brk->btr", x.double(), A[ids].double())  # (B, T, R)
    assert h.shape == exact.shape and h.dtype == torch.bfloat16
    _within_one_ulp(h, exact)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_dora", [False, True], ids=["lora", "dora"])
def test_expand_follows_its_semantics(shape, with_dora):
    x, A, BT, ids, scaling, dora, y0 = _stacks(*shape)
    h = TORCH.lora_shrink(x, A, ids)
    y = LIB.lora_expand(y0.clone(), h, BT, ids, scaling, dora if with_dora else None)
    hs = (h.float() * scaling[ids].view(-1, 1, 1)).bfloat16()  # rounded as the Semantics say
    v = y0.double() + torch.einsum("btr,bro->bto", hs.double(), BT[ids].double())
    if with_dora:
        # v is rounded to bf16 first; with the sum order free, v itself may be one ulp off, so compare
        # against the scale applied to the kernel's own rounding of v, and check v separately.
        v_kernel = LIB.lora_expand(y0.clone(), h, BT, ids, scaling, None)
        _within_one_ulp(v_kernel, v)
        exact = v_kernel.double() * dora[ids].double().unsqueeze(1)
        torch.testing.assert_close(y, exact.to(torch.bfloat16), atol=0, rtol=0)
    else:
        _within_one_ulp(y, v)


def test_rows_do_not_depend_on_the_batch():
    """Row b computed in a batch of 32 distinct adapters equals row b computed alone, bit for bit."""
    x, A, BT, ids, scaling, dora, y0 = _stacks(32, 3, 33, 16, 256, 320, seed=5)
    h = LIB.lora_shrink(x, A, ids)
    y = LIB.lora_expand(y0.clone(), h, BT, ids, scaling, dora)
    for b in (0, 13, 31):
        hb = LIB.lora_shrink(x[b : b + 1].clone(), A, ids[b : b + 1].clone())
        yb = LIB.lora_expand(y0[b : b + 1].clone(), hb, BT, ids[b : b + 1].clone(), scaling, dora)
        assert torch.equal(h[b : b + 1], hb) and torch.equal(y[b : b + 1], yb)


def test_slot_zero_and_unit_scale_leave_y_untouched():
    """Slot 0 holds zeros and DoRA scale 1 ("no adapter"): y comes back bit for bit."""
    x, A, BT, _, scaling, dora, y0 = _stacks(3, 5, 4, 8, 64, 96)
    A[0], BT[0], dora[0] = 0, 0, 1
    ids = torch.zeros(3, dtype=torch.int64)
    y = LIB.lora_expand(y0.clone(), LIB.lora_shrink(x, A, ids), BT, ids, scaling, dora)
    assert torch.equal(y, y0)


def test_roundings_are_torchs_including_nan_and_subnormals():
    """bf16 rounding of the sums: ties to even, NaN propagates, subnormal outputs kept (not flushed).
    (Subnormal *inputs* read as zero where the kernels multiply with VDPBF16PS: the module docstring.)"""
    R, Dout = 1, 48
    BT = torch.ones(1, R, Dout).bfloat16()
    y0 = torch.zeros(1, 1, Dout).bfloat16()
    y0[0, 0, 0] = float("nan")
    y0[0, 0, 1] = 1.0  # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even, 1
    y0[0, 0, 2] = 1.0 + 2**-7  # 1 + 2^-7 + 2^-8 ties to 1 + 2^-6
    h = torch.full((1, 1, R), 2.0**-8).bfloat16()
    y = LIB.lora_expand(y0.clone(), h, BT, torch.zeros(1, dtype=torch.int64), torch.ones(1), None)
    assert torch.isnan(y[0, 0, 0])
    assert y[0, 0, 1].item() == 1.0 and y[0, 0, 2].item() == 1.0 + 2**-6
    # normal y and LoRA term whose sum, 2^-130, is a bf16 subnormal: kept exactly
    near = torch.full((1, 1, R), -(2.0**-125 - 2.0**-130)).bfloat16()
    assert near.item() == -(2.0**-125 - 2.0**-130)  # representable: 1.9375 * 2^-126
    y = LIB.lora_expand(torch.full((1, 1, Dout), 2.0**-125).bfloat16(), near, BT,
                                torch.zeros(1, dtype=torch.int64), torch.ones(1), None)
    assert (y.float() == 2.0**-130).all()


def _bad(x, A, BT, ids, scaling, dora, y, h, what):
    """One argument broken as `what` says, the rest valid."""
    if what == "fp32 x":
        return "shrink", (x.float(), A, ids), "x must be a contiguous CPU torch.bfloat16 tensor"
    if what == "transposed x":
        return "shrink", (x.transpose(0, 1), A, ids), "x must be a contiguous"
    if what == "A of another Din":
        return "shrink", (x, A[:, :, :-1].contiguous(), ids), r"A_stack must be .* shape \(4, 8, 64\), got \(4, 8, 63\)"
    if what == "int32 ids":
        return "shrink", (x, A, ids.int()), "ids must be a contiguous CPU int64 tensor of shape \\(3,\\)"
    if what == "too few ids":
        return "expand", (y, h, BT, ids[:2], scaling, dora), r"ids must be .* shape \(3,\)"
    if what == "bf16 scaling":
        return "expand", (y, h, BT, ids, scaling.bfloat16(), dora), "scaling must be a contiguous CPU torch.float32"
    if what == "dora of another Dout":
        return "expand", (y, h, BT, ids, scaling, dora[:, :-1].contiguous()), r"dora_scale must be .* shape \(4, 96\)"
    return "expand", (y, h[..., :-1].contiguous(), BT, ids, scaling, dora), r"B_stack must be .* shape \(4, 7, 96\)"


@pytest.mark.parametrize("what", ["fp32 x", "transposed x", "A of another Din", "int32 ids", "too few ids",
                                  "bf16 scaling", "dora of another Dout", "h of another rank"])
def test_bad_arguments_raise_and_leave_y_alone(what):
    from adapterhub.errors import KernelArgumentError

    x, A, BT, ids, scaling, dora, y = _stacks(3, 5, 4, 8, 64, 96)
    h = LIB.lora_shrink(x, A, ids)
    y0 = y.clone()
    op, args, match = _bad(x, A, BT, ids, scaling, dora, y, h, what)
    fn = LIB.lora_shrink if op == "shrink" else LIB.lora_expand
    with pytest.raises(KernelArgumentError, match=match):
        fn(*args)
    assert torch.equal(y, y0)
