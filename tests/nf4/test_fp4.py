"""FP4 (runtime/quant/fp4.py) bit-identical to reference/fp4.py and to bitsandbytes 0.50 on CPU, and a
transformers-saved FP4 checkpoint loading as saved: the proof that a format is one file plus its twin.

Edge values (docs/semantics.md §11.2-§11.4): exact midpoints of the sorted table on both sides of zero,
0 < s <= 1/384 (code 8, the sign bit set on a positive value), zeros of both signs, all-zero blocks,
short last blocks and odd n.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.runtime import load_base
from adapterhub.runtime.model.tiny import byte_tokenizer
from adapterhub.runtime.quant import tables
from adapterhub.runtime.quant.fp4 import FP4, FP4Weight
from reference import fp4 as R
from tests.bnb_checkpoints import tiny_llama_4bit

NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SHAPES = [(3, 10), (1, 65), (128, 96), (2, 64), (7,), (33, 31), (300, 257)]


def edge_weight(n: int, G: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random blocks, then: an all-zero block with a -0.0; a block of exact midpoints (scaled by its absmax
    1.0) and their neighbours; tiny positives and negatives around +-1/384 (codes 8 / 0 / 9)."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    mids = FP4.thresholds
    specials = torch.cat([torch.tensor([1.0, -1.0]), mids, torch.nextafter(mids, torch.tensor(2.0)),
                          torch.tensor([1 / 384, -1 / 384, 1e-4, -1e-4, 0.0, -0.0, 1 / 200, -1 / 200])])
    blocks = [w[i : i + G] for i in range(0, n, G)]
    if len(blocks) >= 3:
        blocks[0].zero_()
        blocks[0][1] = -0.0
        blocks[1].copy_(specials.repeat(G // specials.numel() + 1)[:G])
    return w.to(dtype)


def reference_of(q: FP4Weight, w: torch.Tensor) -> dict:
    offset = q.offset.item() if q.double_quant else None  # torch and NumPy sum in other orders (§2.1)
    return R.quantize(w.float().numpy(), q.blocksize, q.double_quant, NAMES[w.dtype], offset=offset)


def test_tables_match_the_reference():
    assert torch.equal(tables.FP4_CODE, torch.from_numpy(R.FP4_CODE))
    assert torch.equal(FP4.order, torch.from_numpy(R.FP4_ORDER).int())
    assert torch.equal(FP4.thresholds, torch.from_numpy(R.FP4_MIDPOINTS))
    assert not torch.equal(tables.FP4_CODE, tables.NF4_CODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_match_the_reference(shape, dtype):
    n = int(np.prod(shape))
    for blocksize, double_quant in [(64, True), (64, False), (32, True), (128, False)]:
        w = edge_weight(n, blocksize, dtype, seed=n + blocksize).view(shape)
        q = FP4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
        ref = reference_of(q, w)
        sd = q.state_dict()
        assert sorted(sd) == sorted(ref)
        for key, expected in ref.items():
            assert np.array_equal(sd[key].numpy(), expected), (shape, dtype, blocksize, key)
        for out in (torch.float32, torch.bfloat16, torch.float16):
            want = np.asarray(R.dequantize(ref, NAMES[out]), np.float32)
            assert torch.equal(q.dequantize(out).float(), torch.from_numpy(want)), out
        assert (q.dequantize(torch.float32) - w.float()).abs().max() > 0  # lossy: not a vacuous comparison


def test_code_8_and_the_zero_codes():
    """s = 0 takes code 0; 0 < s <= 1/384 takes code 8 (its sign bit set); both dequantize to +0.0 (§11.2)."""
    w = torch.tensor([1.0, 0.0, 1 / 384, 1e-3, -1e-3, -0.0, 1 / 383, -1 / 383] * 8)
    codes = FP4Weight.quantize(w, double_quant=False).packed.view(-1)
    nibbles = torch.stack([codes >> 4, codes & 15], dim=1).view(-1)[:8].tolist()
    assert nibbles == [3, 0, 8, 8, 0, 0, 1, 9]
    deq = FP4Weight.quantize(w, double_quant=False).dequantize(torch.float32)[:8]
    assert deq[1:6].eq(0).all() and not torch.signbit(deq[1:6]).any()


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 10), (1, 65), (64, 64), (256, 320), pytest.param((4096, 4096),
                                                                                       marks=pytest.mark.slow)])
def test_matches_bitsandbytes(shape, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    w = edge_weight(int(np.prod(shape)), 64, dtype, seed=1).view(shape)
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=double_quant)
        ours = FP4Weight.quantize(w, double_quant=double_quant)
        assert torch.equal(ours.packed.view(-1), packed.view(-1)), double_quant
        if double_quant:
            assert torch.equal(ours.offset, state.offset) and torch.equal(ours.nested_absmax, state.state2.absmax)
        else:
            assert torch.equal(ours.absmax, state.absmax)
            # bnb's native CPU dequantize is right where a row holds whole blocks (semantics §1.5 quirk 1)
            assert torch.equal(ours.dequantize(dtype), F.dequantize_4bit(packed, state))


@pytest.mark.compat
def test_a_transformers_fp4_checkpoint_loads_as_saved(tmp_path):
    """transformers + bitsandbytes save a tiny Llama in FP4 (train mode, §3.4); load_base adopts the stored
    weights without quantizing: each equals bitsandbytes' own dequantize of it, bit for bit."""
    F = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file

    _, path = tiny_llama_4bit(tmp_path, "fp4", double_quant=True, compute_dtype=torch.bfloat16)
    byte_tokenizer().save(path)  # transformers saved no tokenizer for a model built from a config

    sd = load_file(path / "model.safetensors")
    base = load_base(path, quantize=None, compute_dtype=torch.bfloat16)  # loads as saved
    linears = base.model.linears()
    assert {m.weight.format for m in linears.values()} == {"fp4"} and len(linears) == 2 * 7
    for name, layer in linears.items():
        own = {k[len(name) + len(".weight."):]: v for k, v in sd.items() if k.startswith(name + ".weight.")}
        state = F.QuantState.from_dict(own, device=torch.device("cpu"))
        assert torch.equal(layer.dequantized_weight(), F.dequantize_4bit(sd[name + ".weight"], state)), name
