"""The fused decode ops (kernels/decode.py, csrc/decode_cpu.c) against their torch twins on random inputs: the
model's RMSNorm (after the residual add), F.silu(gate) * up, rotary + the paged cache's `update` + SDPA with
the model's additive mask (as Attention.forward computes it), and F.linear in bf16. Each within
decode.TOLERANCE; the cache writes and the residual stream bit for bit (the same roundings)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime.kernels import build, decode
from adapterhub.runtime.model.kv_cache import KVCache
from adapterhub.runtime.model.layers import RMSNorm
from adapterhub.runtime.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

K = decode.kernels()
pytestmark = pytest.mark.skipif(K is None, reason="no compiled CPU kernels here (the model keeps the torch path)")
DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol, rtol = decode.TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def _randn(*shape, dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_available_where_the_library_builds():
    if not build.is_buildable_here() or os.environ.get(build.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip("the compiled kernels do not run here")
    assert K is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_offset", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
def test_rmsnorm(dtype, is_offset, has_residual):
    x, r = _randn(5, 1, 576, dtype=dtype, seed=0) * 3, _randn(5, 1, 576, dtype=dtype, seed=1)
    norm = RMSNorm(576, 1e-5, dtype, "cpu", is_offset=is_offset)
    norm.weight.data = _randn(576, dtype=dtype, seed=2) * 0.5 + (0 if is_offset else 1)
    stream = x.clone()
    got = K.rmsnorm(stream, norm.weight, 1e-5, residual=r if has_residual else None, is_offset=is_offset)
    want_stream = x + r if has_residual else x
    assert torch.equal(stream, want_stream)  # the residual add rounds once, as torch's
    want = norm(want_stream)
    _close(got, want)
    assert (got.float() - want_stream.float()).abs().amax() > 0.1  # it normalised


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_fused", [False, True])
def test_silu_mul(dtype, is_fused):
    gate_up = _randn(3, 1, 2 * 200, dtype=dtype, seed=3) * 4
    gate, up = gate_up.chunk(2, dim=-1) if is_fused else (gate_up[..., :200].contiguous(), gate_up[..., 200:].contiguous())
    _close(K.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_linear_bf16(M):
    x, W = _randn(M, 1, 80, dtype=torch.bfloat16, seed=4), _randn(300, 80, dtype=torch.bfloat16, seed=5)
    _close(K.linear_bf16(x, W), F.linear(x, W))


def _history(dtype, seed, lengths=(5, 1, 17), block_size=4):
    """A paged cache whose rows 2, 0, 3 hold `lengths` tokens of random keys / values, their blocks interleaved,
    with room for one more token each; and its copy."""
    rows, max_seq = [2, 0, 3], max(lengths) + 1
    shape = (2, 4, 3, max_seq, 64)  # (L, Bmax, Hkv, S, Dh)
    num_blocks = sum(-(-(n + 1) // block_size) for n in lengths)
    cache = KVCache(*shape, dtype=dtype, num_blocks=num_blocks, block_size=block_size)
    for step in range(max_seq):  # grow the rows a token at a time, so their blocks interleave
        cache.allocate(rows, [min(n + 1, step + 1) for n in lengths])
    cache.k.copy_(_randn(*cache.k.shape, dtype=dtype, seed=seed))
    cache.v.copy_(_randn(*cache.v.shape, dtype=dtype, seed=seed + 1))
    cache.lengths[rows] = torch.tensor(lengths)
    twin = KVCache(*shape, dtype=dtype, num_blocks=num_blocks, block_size=block_size)
    twin.k.copy_(cache.k), twin.v.copy_(cache.v)
    return cache, twin, rows


CASES = {  # name: (cached tokens per row, block size, window, query heads)
    "gqa": ((5, 1, 17), 4, None, 9), "mha": ((5, 1, 17), 4, None, 3), "window": ((5, 1, 17), 4, 6, 9),
    # past 512 keys SDPA works in blocks of 512, rescaling its running sums: the kernel does the same
    "long": ((700, 30, 515), 16, None, 9), "long-window": ((700, 30, 515), 16, 600, 9),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_over_paged_blocks(dtype, case):
    """One decode token per row: rotary, the cache write and the attention of layer 1 equal torch's rotary +
    KVCache.update + SDPA with the model's additive (windowed) mask."""
    lengths, block_size, window, heads = CASES[case]
    H, Hkv, Dh, B, layer = heads, 3, 64, 3, 1
    cache, twin, rows = _history(dtype, seed=6, lengths=lengths, block_size=block_size)
    step = cache.step(rows, 1)
    assert any(b - a != 1 for a, b in zip(step.tables[2], step.tables[2][1:]))  # the row's blocks interleave
    q, k, v = (_randn(B, 1, n * Dh, dtype=dtype, seed=s) for n, s in ((H, 7), (Hkv, 8), (Hkv, 9)))
    cos, sin = rope_cos_sin(step.positions, rope_inv_freq(10000.0, Dh), dtype)  # (B, 1, 1, Dh)
    out = torch.empty(B, 1, H * Dh, dtype=dtype)
    got = K.attention(q, k, v, cos, sin, cache.k, cache.v, layer, step.positions.reshape(B).contiguous(),
                      step.tables, step.span, heads=H, kv_heads=Hkv, scale=Dh**-0.5, window=window, out=out)

    qr = apply_rope(q.view(B, 1, H, Dh).transpose(1, 2), cos, sin)  # (B, H, 1, Dh)
    kr = apply_rope(k.view(B, 1, Hkv, Dh).transpose(1, 2), cos, sin)
    keys, values = twin.update(layer, step, kr, v.view(B, 1, Hkv, Dh).transpose(1, 2))  # (B, Hkv, span, Dh)
    distance = step.positions[:, :, None] - torch.arange(step.span)  # (B, 1, span)
    additive = lambda visible: torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None]  # noqa: E731
    mask = additive((distance >= 0) & (distance < (window or step.span + 1)))  # (B, 1, 1, span)
    want = F.scaled_dot_product_attention(qr, keys, values, attn_mask=mask, enable_gqa=H != Hkv)  # (B, H, 1, Dh)
    want = want.transpose(1, 2).reshape(B, 1, H * Dh)

    assert torch.equal(cache.k, twin.k) and torch.equal(cache.v, twin.v)  # rotated keys and values, in their slots
    _close(got, want)
    unwindowed = F.scaled_dot_product_attention(qr, keys, values, attn_mask=additive(distance >= 0), enable_gqa=H != Hkv)
    if window is not None:  # the window hides keys of the longest row: not a no-op
        assert (want - unwindowed.transpose(1, 2).reshape(B, 1, H * Dh)).abs().amax() > 1e-2
