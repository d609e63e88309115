"""adapterhub.nf4 against bitsandbytes 0.50 on CPU, and transformers' 4-bit files."""

import json

import numpy as np
import pytest
import torch

from adapterhub import nf4
from reference import nf4 as R
from tests.bnb_checkpoints import tiny_llama_4bit

bnb_functional = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.compat

SHAPES = [(3, 10), (1, 65), (128, 96), pytest.param((4096, 4096), marks=pytest.mark.slow),
          pytest.param((11008, 4096), marks=pytest.mark.slow)]  # fmt: skip


def bnb_quantize(w, double_quant):
    return bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    packed, state = bnb_quantize(w, double_quant=False)
    ours = nf4.quantize(w, double_quant=False)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)  # the true block absmax c

    packed_dq, state_dq = bnb_quantize(w, double_quant=True)
    ours_dq = nf4.quantize(w, double_quant=True)
    assert torch.equal(ours_dq.packed, packed_dq)
    assert torch.equal(ours_dq.offset, state_dq.offset)
    assert torch.equal(ours_dq.nested_absmax, state_dq.state2.absmax)
    # §2.3: bnb's CPU picks the 8-bit index through a 65 536-bin table; ours is the exact nearest.
    true = state.absmax.double()
    ours_err = (ours_dq.absmax_f32.double() - true).abs()
    bnb_absmax = bnb_functional.dequantize_blockwise(state_dq.absmax, state_dq.state2) + state_dq.offset
    bnb_err = (bnb_absmax.double() - true).abs()
    nested = state_dq.state2.absmax.double().repeat_interleave(256)[: true.numel()]
    ulp = torch.finfo(torch.float32).eps * true  # the multiply and the add each round once (§2.1.5)
    assert torch.all(ours_err <= bnb_err + 2 * ulp)  # never farther than bnb's, up to rounding
    assert torch.all(ours_err <= bnb_err + 3e-5 * nested)  # the wording of the same bound
    half_gap = float(np.diff(R.DYNAMIC_CODE.astype(np.float64)).max() / 2)
    assert torch.all(ours_err <= half_gap * nested + 2 * ulp)  # exact nearest: half the widest code gap


@pytest.mark.parametrize("shape", [(128, 96), (64, 300), (40, 1000)])
def test_reference_emulates_the_bnb_cpu_table_bit_for_bit(shape):
    """With the §2.3 table emulation the reference reproduces bnb's double-quant bytes exactly
    (shapes with more than one block; a single block has nested absmax 0, where bnb's CPU gives 0)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, state = bnb_quantize(w, double_quant=True)
    ref = R.quantize(w.float().numpy(), 64, True, "bfloat16", offset=state.offset.item(), index=R.bnb_cpu_dynamic_index)
    assert np.array_equal(ref["weight.absmax"], state.absmax.numpy())
    exact = R.quantize(w.float().numpy(), 64, True, "bfloat16", offset=state.offset.item())
    assert np.array_equal(exact["weight.nested_absmax"], state.state2.absmax.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_cpu_dequantize_surprise_on_rows_without_whole_blocks(dtype):
    """semantics §1.5 quirk 1: for a last dim that is a multiple of 16 but not of the blocksize, bnb's
    native CPU kernel indexes absmax per row (row * (K // G) + col // G). Ours stays correct."""
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = bnb_quantize(w, double_quant=False)
    correct = torch.from_numpy(R.dequantize(R.quantize(w.float().numpy(), 64, False, "float32"))).to(dtype)
    assert torch.equal(nf4.dequantize(nf4.quantize(w, double_quant=False)), correct)
    theirs = bnb_functional.dequantize_4bit(packed, state)
    codes = R.unpack(packed.numpy(), w.numel()).reshape(128, 96)
    rows, cols = np.indices((128, 96))
    buggy_absmax = state.absmax.numpy()[np.minimum(rows * (96 // 64) + cols // 64, state.absmax.numel() - 1)]
    buggy = torch.from_numpy(R.NF4_CODE[codes] * buggy_absmax).to(dtype)
    assert torch.equal(theirs, correct) or torch.equal(theirs, buggy)  # which one depends on the CPU path
    assert not torch.equal(buggy, correct)  # the two differ: this shape does exercise the bug


def test_transformers_checkpoint_dequantizes_like_bitsandbytes(tmp_path):
    from safetensors.torch import load_file

    dense, path = tiny_llama_4bit(tmp_path, "nf4", compute_dtype=torch.bfloat16)
    path = path / "model.safetensors"
    sd = load_file(path)
    prefixes = sorted(k[: -len(".weight.quant_state.bitsandbytes__nf4")] for k in sd if k.endswith("bitsandbytes__nf4"))
    assert len(prefixes) == 2 * 7  # q/k/v/o/gate/up/down in each layer; lm_head and embeddings stay bf16 (§3.2)
    for prefix in prefixes:
        q = nf4.NF4Weight.from_state_dict(sd, prefix + ".")
        assert q.dtype == torch.bfloat16 and q.double_quant
        own = {k[len(prefix) + len(".weight.") :]: v for k, v in sd.items() if k.startswith(prefix + ".weight.")}
        state = bnb_functional.QuantState.from_dict(own, device=torch.device("cpu"))
        theirs = bnb_functional.dequantize_4bit(sd[prefix + ".weight"], state)
        ours = nf4.dequantize(q)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        assert torch.equal(ours, theirs), prefix
        assert not torch.equal(ours, dense[prefix + ".weight"])  # quantization changed the weight
        # quantize-on-load is byte-identical to ours of the original bf16 weight, offset included (§3.2)
        again = nf4.quantize(dense[prefix + ".weight"])
        for key, value in again.state_dict(prefix + ".").items():
            if key.endswith("bitsandbytes__nf4"):
                assert json.loads(bytes(value.tolist())) == json.loads(bytes(sd[key].tolist()))
            elif not key.endswith(".absmax"):  # q8 may differ: bnb's CPU table (§2.3)
                assert torch.equal(value.view(-1), sd[key].view(-1)), key


def test_all_zero_tail_block_absmax_surprise():
    """bnb stores its clamped divisor (1e-38) as the absmax of an all-zero tail block; the spec (§1.3)
    and adapterhub store 0. The codes (0x77) and the dequantized zeros agree."""
    w = torch.zeros(1, 65)
    w[0, :64] = torch.linspace(-1, 1, 64)
    packed, state = bnb_quantize(w, double_quant=False)
    ours = nf4.quantize(w, double_quant=False)
    assert torch.equal(ours.packed, packed) and packed[-1, 0] == 0x77
    assert ours.absmax[-1] == 0 and state.absmax[-1] == torch.tensor(1e-38)
    assert torch.equal(ours.absmax[:-1], state.absmax[:-1])
    assert nf4.dequantize(ours)[0, 64] == 0 == bnb_functional.dequantize_4bit(packed, state)[0, 64]
