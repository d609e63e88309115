"""adapterhub.nf4 bit-identical to reference/nf4.py (NumPy), plus state-dict validation.

Every test runs twice: on the device's ops (the compiled CPU kernels, where they build) and on the torch
`Ops`, forced by making kernels.ops_for return it. tests/runtime/test_cpu_kernels.py compares the two directly."""

import hashlib

import numpy as np
import pytest
import torch

from adapterhub import nf4
from adapterhub.errors import QuantizationError
from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Ops, compiled
from adapterhub.runtime.kernels import ops as ops_module
from adapterhub.runtime.quant import fourbit, tables
from adapterhub.runtime.quant.nf4 import NF4
from reference import nf4 as R

NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def path(request, monkeypatch):
    """Which implementation quantize / dequantize_into use on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "ops_for", lambda device: Ops(device))
    elif compiled.library() is None:
        pytest.skip("compiled CPU kernels unavailable: the torch run covers this test")
    return request.param


def reference_of(q: nf4.NF4Weight, w: torch.Tensor, index=R.nearest_dynamic_index) -> dict:
    """The reference state dict of w, given the torch offset (torch and NumPy sum in other orders, §2.1)."""
    offset = q.offset.item() if q.double_quant else None
    return R.quantize(w.float().numpy(), q.blocksize, q.double_quant, NAMES[w.dtype], offset=offset, index=index)


def assert_same_state(q: nf4.NF4Weight, ref: dict) -> None:
    sd = q.state_dict()
    assert sorted(sd) == sorted(ref)
    for key, expected in ref.items():
        got = sd[key].numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert np.array_equal(got, expected), key


def test_tables_match_the_reference():
    assert torch.equal(tables.NF4_CODE, torch.from_numpy(R.NF4_CODE))
    assert torch.equal(tables.DYNAMIC_CODE, torch.from_numpy(R.DYNAMIC_CODE))
    assert torch.equal(NF4.thresholds, torch.from_numpy(R.NF4_MIDPOINTS))
    assert torch.equal(fourbit.DYNAMIC.thresholds, torch.from_numpy(R.DYNAMIC_THRESHOLDS))
    assert tables.BLOCKSIZES == R.BLOCKSIZES and tables.NESTED_BLOCKSIZE == R.NESTED_BLOCKSIZE
    digest = hashlib.sha256(tables.NF4_CODE.numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"


def test_code_table_on_every_threshold_and_neighbour():
    """The one-lookup coder equals counting thresholds, at and around each of them (ties lower)."""
    for coder, thresholds in [
        (NF4.coder, R.NF4_MIDPOINTS),
        (fourbit.DYNAMIC.coder, R.DYNAMIC_THRESHOLDS),
    ]:
        t = thresholds
        s = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)), [0.0, -0.0, 1.0, -1.0]])
        s = np.concatenate([s, np.random.default_rng(0).uniform(-1, 1, 5000)]).astype(np.float32)
        key = torch.empty(s.size, dtype=torch.int32)
        got = coder.codes(torch.from_numpy(s.copy()), key, torch.empty_like(key)).numpy().astype(np.uint8)
        assert np.array_equal(got, np.searchsorted(t, s, side="left"))


SHAPES = [(3, 10), (1, 65), (128, 96), (2, 64), (7,), (33, 31), (300, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_match_reference(shape, dtype):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    for blocksize, double_quant in [(64, True), (64, False), (32, True), (256, True)]:
        q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
        ref = reference_of(q, w)
        assert_same_state(q, ref)
        assert q.shape == tuple(shape) and q.dtype == dtype and q.packed.shape == ((w.numel() + 1) // 2, 1)
        assert torch.equal(q.absmax_f32, torch.from_numpy(R.dequantize_absmax(ref)))
        exact = torch.from_numpy(R.dequantize(ref))
        assert torch.equal(nf4.dequantize(q, torch.float32), exact)
        out = nf4.dequantize(q)  # the original dtype
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out.float(), torch.from_numpy(np.asarray(R.dequantize(ref, NAMES[dtype]), np.float32)))
        for other in (torch.bfloat16, torch.float16):
            assert torch.equal(nf4.dequantize(q, other), exact.to(other))  # float32 product, then RNE (§1.5)
        assert (out.float() - w.float()).abs().max() > 0  # lossy: the comparison is not vacuous


@pytest.mark.parametrize("blocksize", tables.BLOCKSIZES)
def test_every_blocksize_with_zero_blocks_and_tails(blocksize):
    n = 3 * blocksize + 5
    w = torch.randn(n, generator=torch.Generator().manual_seed(blocksize))
    w[blocksize : 2 * blocksize] = 0  # an all-zero block: code 7, absmax 0 (§1.3)
    w[2 * blocksize] = -0.0
    q = nf4.quantize(w.to(torch.bfloat16), blocksize=blocksize)
    assert_same_state(q, reference_of(q, w.to(torch.bfloat16)))
    plain = nf4.quantize(w, blocksize=blocksize, double_quant=False)
    assert plain.absmax[1] == 0 and torch.all(plain.packed[blocksize // 2 : blocksize] == 0x77)
    assert torch.equal(q.packed, nf4.quantize(w.to(torch.bfloat16), blocksize=blocksize, double_quant=False).packed)
    assert torch.all(nf4.dequantize(plain)[blocksize : 2 * blocksize] == 0)


def test_chunk_boundaries_and_large_weight():
    """More than one internal chunk (2**18 elements) with a tail: still identical to the reference."""
    w = torch.randn(2 * 1024 + 1, 300, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    q = nf4.quantize(w)
    ref = reference_of(q, w)
    assert_same_state(q, ref)
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    assert nf4.dequantize_into(q, out) is out
    assert torch.equal(out.float(), torch.from_numpy(R.dequantize(ref, "bfloat16")))


def test_state_dict_round_trip_and_prefix():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = nf4.quantize(w)
    sd = q.state_dict("model.layers.0.mlp.up_proj.")
    sd["model.layers.0.mlp.up_proj.bias"] = torch.zeros(64)
    back = nf4.NF4Weight.from_state_dict(sd, prefix="model.layers.0.mlp.up_proj.")
    assert back.shape == (64, 96) and back.dtype == torch.bfloat16 and back.blocksize == 64 and back.double_quant
    assert torch.equal(back.offset, q.offset) and torch.equal(back.absmax, q.absmax)
    assert torch.equal(nf4.dequantize(sd), nf4.dequantize(q))  # prefix inferred from the single blob key
    bytes_view = {**q.state_dict(), "weight": q.packed.view(-1).view(torch.bfloat16).view(-1, 1)}  # quant_storage bf16
    assert torch.equal(nf4.dequantize(bytes_view), nf4.dequantize(q))


def _broken(mutate):
    sd = nf4.quantize(torch.randn(8, 64)).state_dict()
    mutate(sd)
    return sd


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.pop("weight.absmax"), "lacks 'weight.absmax'"),
        (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"].float()), "must be torch.uint8"),
        (lambda sd: sd.__setitem__("weight", sd["weight"][:-1]), "256 elements"),
        (lambda sd: sd.__setitem__("weight.quant_map", -sd["weight.quant_map"]), "nf4 codebook"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__fp4", sd["weight.quant_state.bitsandbytes__nf4"]), "exactly one"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2], dtype=torch.uint8)), "JSON"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.frombuffer(bytearray(
            b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 64], "nested_blocksize": 256, '
            b'"nested_dtype": "bfloat16", "nested_offset": 0.5}'), dtype=torch.uint8)), "train mode"),
        (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.frombuffer(bytearray(
            b'{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [8, 64]}'), dtype=torch.uint8)), "blocksize"),
    ],
)  # fmt: skip
def test_from_state_dict_rejects_malformed_input(mutate, message):
    with pytest.raises(QuantizationError, match=message):
        nf4.NF4Weight.from_state_dict(_broken(mutate))


def test_quantize_rejects_bad_input():
    with pytest.raises(QuantizationError, match="float32, bfloat16 or float16"):
        nf4.quantize(torch.ones(64, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="blocksize 48"):
        nf4.quantize(torch.ones(64), blocksize=48)
    with pytest.raises(QuantizationError, match="empty"):
        nf4.quantize(torch.ones(0, 64))


def test_worker_threads_do_not_change_results():
    """Chunks are spread over torch.get_num_threads() Python threads; the bytes must not depend on it."""
    w = torch.randn(777, 640, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3):
            torch.set_num_threads(count)
            q = nf4.quantize(w, double_quant=False)
            results.append((q.packed, q.absmax, nf4.dequantize(q)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_one_step_path_equals_chunked(monkeypatch):
    """Off the CPU the whole weight is one step (Ops.chunk); emulate it here with a huge chunk size."""
    w = torch.randn(300, 1000, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    chunked = nf4.quantize(w)
    monkeypatch.setattr(ops_module, "CPU_CHUNK", 1 << 22)
    whole = nf4.quantize(w)
    for key, value in chunked.state_dict().items():
        assert torch.equal(value, whole.state_dict()[key]), key
    assert torch.equal(nf4.dequantize(whole), nf4.dequantize(chunked))


def test_parameters_quantize_like_plain_tensors():
    """A Parameter (requires_grad) quantizes like its data; the result holds no autograd graph."""
    linear = torch.nn.Linear(64, 32)
    q = nf4.quantize(linear.weight)
    assert torch.equal(q.packed, nf4.quantize(linear.weight.detach()).packed)
    assert not q.absmax_f32.requires_grad and not nf4.dequantize(q).requires_grad

