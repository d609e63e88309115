"""reference/fp4.py: golden values (docs/semantics.md §11) and bit-equality with bitsandbytes 0.50 on CPU.

Shapes: n = weight elements, G = blocksize, B = ceil(n / G), B2 = ceil(B / 256).
"""

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from reference import fp4 as R
from reference import nf4
from tests.bnb_checkpoints import tiny_llama_4bit

FP4_SHA256 = "b830bcf8857895e5676b8e2ce608a60bb8af9b3ce6270073e9de34814196f09c"
# §11.1, independently: bnb divides 0, .0625, 8, 12, 4, 6, 2, 3 (and negatives) by 12 in float32.
MAGNITUDES = np.float32([0, 0.0625, 8, 12, 4, 6, 2, 3])


def sha(values):
    return hashlib.sha256(np.asarray(values, dtype="<f4").tobytes()).hexdigest()


def codes_of(sd, n):
    return nf4.unpack(sd["weight"], n)


# ---------------------------------------------------------------- reference only (NumPy)


def test_codebook_golden():
    code = R.FP4_CODE
    assert sha(code) == FP4_SHA256
    expected = np.concatenate([MAGNITUDES, -MAGNITUDES]) / np.float32(12)  # -0 / 12 is -0.0 here ...
    expected[8] = 0.0  # ... but bnb writes the literal -0 as the int 0: both zeros are +0.0 (§11.1)
    assert code.view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    assert not np.signbit(code[[0, 8]]).any()  # no -0.0 in the table
    assert np.array_equal(code[8:], -code[:8]) and code[3] == 1 and code[11] == -1  # bit 3 is the sign
    assert not np.array_equal(code, nf4.NF4_CODE) and sha(code) != sha(nf4.NF4_CODE)
    assert np.array_equal(np.sort(code), code[R.FP4_ORDER])


def test_midpoints_and_ties():
    """§11.2: code = FP4_ORDER[#midpoints strictly below s]; a value on a midpoint takes the lower entry."""
    mids = R.FP4_MIDPOINTS
    assert mids[7] == 0 and np.all(np.diff(mids) >= 0)
    for w, pos in [(mids, np.arange(15)), (np.nextafter(mids, np.float32(2)), np.arange(1, 16))]:
        w = np.concatenate([[1.0], w]).astype(np.float32)  # absmax 1: s = x exactly
        codes = codes_of(R.quantize(w, blocksize=32, double_quant=False), w.size)
        assert codes[1:].tolist() == R.FP4_ORDER[pos].tolist()
    # near zero the sign bit is not the sign of the value: 0 and -tiny -> code 0, +tiny -> code 8
    up, down = np.nextafter(mids, np.float32(1)), np.nextafter(mids, np.float32(-1))
    w = np.float32([1.0, 0.0, -0.0, 1e-30, -1e-30, mids[8], up[8], mids[6], down[6]])
    assert codes_of(R.quantize(w, blocksize=32, double_quant=False), w.size).tolist() == [3, 0, 0, 8, 0, 8, 1, 9, 9]


def test_packing_padding_and_zero_blocks():
    """§11.3-§11.4: high nibble first, odd n padded with code 0, zero blocks all code 0."""
    sd = R.quantize(np.float32([1.0, -1.0, 0.5]), double_quant=False)
    assert sd["weight"].shape == (2, 1) and sd["weight"].reshape(-1).tobytes() == bytes([0x3B, 0x50])
    assert R.dequantize(sd).tolist() == [1.0, -1.0, 0.5]
    w = np.zeros(64 * 3 + 1, np.float32)
    w[:64] = np.linspace(-3, 3, 64)
    w[-1] = 0.75  # a lone tail element is +-its absmax: code 3
    sd = R.quantize(w, blocksize=64, double_quant=False)
    assert np.all(sd["weight"][32:96] == 0x00) and sd["weight"][96, 0] == 0x30
    assert sd["weight.absmax"].tolist() == [3.0, 0.0, 0.0, 0.75]
    assert np.all(R.dequantize(sd)[64:192] == 0) and R.dequantize(sd)[-1] == np.float32(0.75)


def test_json_blob_and_keys():
    sd = R.quantize(np.ones((64, 64), np.float32), dtype="bfloat16", offset=np.float32(0.25))
    assert bytes(sd[R.STATE_KEY]) == (
        b'{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64], "nested_blocksize": 256, '
        b'"nested_dtype": "float32", "nested_offset": 0.25}'
    )
    keys = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == keys | {R.STATE_KEY}
    assert np.array_equal(sd["weight.nested_quant_map"], nf4.DYNAMIC_CODE)
    with pytest.raises(ValueError, match="FP4"):
        R.dequantize(nf4.quantize(np.ones(64, np.float32)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_formula(dtype):
    rng = np.random.default_rng(1)
    w = R.round_to(rng.standard_normal((7, 40)).astype(np.float32), dtype).astype(np.float32)
    sd = R.quantize(w, blocksize=32, dtype=dtype)
    absmax = np.repeat(nf4.dequantize_absmax(sd), 32)[: w.size]
    exact = (R.FP4_CODE[codes_of(sd, w.size)] * absmax).reshape(7, 40)  # float32 product (§11.7)
    assert np.array_equal(R.dequantize(sd), exact) and np.abs(exact - w).max() > 0
    rounded = np.asarray(R.round_to(exact, dtype), np.float32)
    assert np.array_equal(np.asarray(R.dequantize(sd, dtype), np.float32), rounded)
    assert np.count_nonzero(exact) > w.size // 2


def test_reference_imports_numpy_only():
    """reference/ is NumPy-only (besides the standard library and itself)."""
    for name in ("fp4.py", "nf4.py"):
        tree = ast.parse((Path(nf4.__file__).parent / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert {m.split(".")[0] for m in mods} <= {"numpy", "reference", "hashlib", "json"}, (name, mods)


# ---------------------------------------------------------------- against bitsandbytes (CPU)


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _torch():
    return pytest.importorskip("torch")


DTYPES = ["float32", "bfloat16", "float16"]
# (shape, G): odd n, odd last dim (bnb's torch path), rows without whole blocks (bnb's row bug), tails,
# G >= 2048 (bnb's torch path again), and the LLM scale.
CASES = [(s, G) for s in [(3, 10), (1, 65), (128, 96), (33, 64), (7, 333), (2, 4096)] for G in (32, 64, 2048)]
CASES += [pytest.param((4096, 4096), 64, marks=pytest.mark.slow)]


def _weight(shape, dtype, seed):
    """Normal weights with a random scale per row (so blocks differ), in `dtype`."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (torch.rand(shape[0], 1, generator=gen) * 3 + 0.01)
    return w.to(getattr(torch, dtype))


def _native_row_bug(shape, G):
    """§1.5 quirk 1 (also FP4, §11.8): the native AVX512 kernel indexes absmax per row; wrong when the
    last dim is a multiple of 16 but not of G (even last dim, G < 2048, else other paths run)."""
    last = shape[-1]
    return last % 16 == 0 and last % G != 0 and G < 2048


def _bits(torch, t):
    return t.reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _assert_dequant_equal(torch, bnb_out, ref, dtype, shape, G):
    """bnb's dequantized weight == the reference's: equal values, so equal bits except the sign of a zero
    (code 8 is -0.0 on bnb's native scalar kernel, §11.8); all bits on bnb's torch path (odd last dim)."""
    ours = torch.from_numpy(np.asarray(ref)).to(getattr(torch, dtype))
    assert ours.shape == bnb_out.shape and ours.dtype == bnb_out.dtype
    assert torch.count_nonzero(ours) > 0  # not a vacuous comparison of zeros
    if _native_row_bug(shape, G):
        return  # bnb's output is wrong here: see test_bnb_codebook_and_cpu_dequantize_quirks
    assert torch.equal(ours, bnb_out)
    if shape[-1] % 2:
        assert torch.equal(_bits(torch, ours), _bits(torch, bnb_out))


@pytest.mark.compat
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", CASES)
def test_matches_bitsandbytes(shape, G, dtype):
    torch, F = _torch(), _bnb()
    w = _weight(shape, dtype, seed=sum(shape) + G)
    x = w.float().numpy()
    n = x.size
    packed, state = F.quantize_4bit(w, blocksize=G, quant_type="fp4", compress_statistics=False)
    sd = R.quantize(x, G, double_quant=False, dtype=dtype)
    assert np.array_equal(sd["weight"], packed.numpy())  # packed bytes, shape ((n+1)//2, 1)
    assert np.array_equal(sd["weight.absmax"], state.absmax.numpy())  # the true block absmax (B,)
    blob = state.as_dict(packed=True)
    assert bytes(sd[R.STATE_KEY]) == bytes(blob["quant_state.bitsandbytes__fp4"].tolist())
    assert np.array_equal(sd["weight.quant_map"].view(np.uint32), blob["quant_map"].numpy().view(np.uint32))
    assert np.count_nonzero(codes_of(sd, n) % 8) > n // 2  # mostly nonzero codes: the comparisons below bite
    _assert_dequant_equal(torch, F.dequantize_4bit(packed, state), R.dequantize(sd, dtype), dtype, shape, G)

    # double quantization (§11.5 = NF4's §2): same codes, offset = torch mean, nested absmax identical
    packed_dq, st = F.quantize_4bit(w, blocksize=G, quant_type="fp4", compress_statistics=True)
    assert torch.equal(packed_dq, packed)
    assert torch.equal(torch.from_numpy(sd["weight.absmax"]).mean(), st.offset)
    numpy_offset = R.quant_state(R.quantize(x, G, True, dtype))["nested_offset"]  # NumPy's float32 mean
    assert abs(numpy_offset - st.offset.item()) <= 8 * np.spacing(st.offset.numpy())  # summation order (§2.1)
    exact = R.quantize(x, G, True, dtype, offset=st.offset.item())
    assert np.array_equal(exact["weight"], packed.numpy())
    assert np.array_equal(exact["weight.nested_absmax"], st.state2.absmax.numpy())
    assert bytes(exact[R.STATE_KEY]) == bytes(st.as_dict(packed=True)["quant_state.bitsandbytes__fp4"].tolist())
    # 8-bit indices, as tests/nf4/test_compat_bnb.py: bnb's CPU table (§2.3) vs exact nearest, by error bound
    true = state.absmax.double()
    nested = st.state2.absmax.double().repeat_interleave(256)[: true.numel()]
    ours_err = (torch.from_numpy(nf4.dequantize_absmax(exact)).double() - true).abs()
    bnb_err = ((F.dequantize_blockwise(st.absmax, st.state2) + st.offset).double() - true).abs()
    ulp = torch.finfo(torch.float32).eps * (nested + st.offset.abs())  # one rounding each: multiply, add (§2.1.5)
    assert torch.all(ours_err <= bnb_err + 2 * ulp) and torch.all(ours_err <= bnb_err + 3e-5 * nested)
    half_gap = float(np.diff(nf4.DYNAMIC_CODE.astype(np.float64)).max() / 2)
    assert torch.all(ours_err <= half_gap * nested + 2 * ulp)
    # ... and bit for bit with the CPU-table emulation (a nested block with absmax 0, B == 1 here, excepted)
    emulated = R.quantize(x, G, True, dtype, offset=st.offset.item(), index=R.bnb_cpu_dynamic_index)
    if np.all(emulated["weight.nested_absmax"] > 0):
        assert np.array_equal(emulated["weight.absmax"], st.absmax.numpy())
        _assert_dequant_equal(torch, F.dequantize_4bit(packed_dq, st), R.dequantize(emulated, dtype), dtype, shape, G)


def _edge_weight():
    """(7, 64) float32: midpoints exactly, next floats up/down, +-tiny, +-0, a zero block, a tail block."""
    mids = R.FP4_MIDPOINTS
    rows = np.zeros((7, 64), np.float32)
    rows[0, :31] = np.concatenate([[1.0], mids, np.nextafter(mids, np.float32(2))])
    rows[1, :31] = np.concatenate([[-1.0], mids, np.nextafter(mids, np.float32(-2))])
    rows[2, :11] = np.float32([0.5, 0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.5 * mids[8], -0.5 * mids[8], 0.25, -0.25])
    rows[3] = 0.0  # an all-zero block
    rows[4, :31] = np.concatenate([[4.0], 4 * mids, 4 * np.nextafter(mids, np.float32(2))])  # absmax 4: s = x / 4
    rows[5] = np.linspace(-2, 1, 64)
    rows[6, :31] = np.concatenate([[1.0], mids, np.nextafter(mids, np.float32(2))])  # the tail block (below)
    return rows.reshape(-1)[: 6 * 64 + 31]  # n = 415: odd, tail block of 31 elements


@pytest.mark.compat
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_cases_match_bitsandbytes(dtype, G):
    torch, F = _torch(), _bnb()
    w = torch.from_numpy(_edge_weight()).to(getattr(torch, dtype))
    x = w.float().numpy()
    packed, state = F.quantize_4bit(w, blocksize=G, quant_type="fp4", compress_statistics=False)
    sd = R.quantize(x, G, double_quant=False, dtype=dtype)
    assert np.array_equal(sd["weight"], packed.numpy())
    assert packed[-1, 0] & 15 == R.ZERO_CODE  # odd n: the padding nibble
    zero = state.absmax.numpy() == 0
    assert np.array_equal(sd["weight.absmax"], state.absmax.numpy())
    assert zero.any() == (G <= 64)  # an interior all-zero block (row 3) stores absmax 0 (§11.3)
    codes = codes_of(sd, x.size)
    assert {0, 8} <= set(codes.tolist()) and len(set(codes.tolist())) == 16  # every code, both zeros
    theirs = F.dequantize_4bit(packed, state).reshape(-1)  # (n,)
    _assert_dequant_equal(torch, theirs, R.dequantize(sd, dtype), dtype, (x.size,), G)


@pytest.mark.compat
def test_all_zero_tail_block_absmax_surprise():
    """As NF4 (§10): bnb stores its clamped divisor 1e-38 as the absmax of an all-zero tail block; the
    reference stores 0. Codes (0x00, padding 0) and dequantized zeros agree."""
    torch, F = _torch(), _bnb()
    w = torch.zeros(1, 65)
    w[0, :64] = torch.linspace(-1, 1, 64)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    sd = R.quantize(w.numpy(), 64, double_quant=False)
    assert np.array_equal(sd["weight"], packed.numpy()) and packed[-1, 0] == 0x00
    assert sd["weight.absmax"][-1] == 0 and state.absmax[-1] == torch.tensor(1e-38)
    assert R.dequantize(sd)[0, 64] == 0 == F.dequantize_4bit(packed, state)[0, 64]


@pytest.mark.compat
def test_bnb_codebook_and_cpu_dequantize_quirks():
    """§11.1: bnb's table is FP4_CODE bit for bit. §11.8: its native CPU kernel has the per-row absmax bug,
    and its scalar path (last dim even, not a multiple of 16) writes -0.0 for code 8; the reference +0.0."""
    torch, F = _torch(), _bnb()
    assert np.array_equal(F.get_4bit_type("fp4", device="cpu").numpy().view(np.uint32), R.FP4_CODE.view(np.uint32))
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("no native bitsandbytes CPU library")
    w = torch.tensor([[1.0, 1e-4] * 5, [1.0, -1e-4] * 5])  # (2, 10): codes 3, 8 / 3, 0
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    assert packed.view(-1)[:5].tolist() == [0x38] * 5 and packed.view(-1)[5:].tolist() == [0x30] * 5
    theirs = F.dequantize_4bit(packed, state)
    ours = torch.from_numpy(R.dequantize(R.quantize(w.numpy(), 64, double_quant=False)))
    assert torch.equal(theirs, ours) and not torch.signbit(ours).any()
    assert torch.signbit(theirs[0, 1::2]).all() and not torch.signbit(theirs[1]).any()
    # per-row absmax bug (shape (128, 96), G = 64): bnb is either correct or the buggy formula (path-dependent)
    w = _weight((128, 96), "float32", 0)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    sd = R.quantize(w.numpy(), 64, double_quant=False)
    correct = torch.from_numpy(R.dequantize(sd))
    theirs = F.dequantize_4bit(packed, state)
    rows, cols = np.indices((128, 96))
    buggy_absmax = sd["weight.absmax"][np.minimum(rows * (96 // 64) + cols // 64, sd["weight.absmax"].size - 1)]
    buggy = torch.from_numpy(R.FP4_CODE[codes_of(sd, w.numel()).reshape(128, 96)] * buggy_absmax)
    assert torch.equal(theirs, correct) or torch.equal(theirs, buggy)
    assert not torch.equal(buggy, correct)


@pytest.mark.compat
@pytest.mark.parametrize("double_quant", [False, True])
def test_transformers_fp4_checkpoint(tmp_path, double_quant):
    """§11.6: a transformers-saved FP4 checkpoint dequantized by the reference equals bnb's dequantize bit for
    bit; the saved tensors are the reference's quantization of the original bf16 weights."""
    torch, F = _torch(), _bnb()
    from safetensors.torch import load_file

    dense, path = tiny_llama_4bit(tmp_path, "fp4", double_quant)
    sd = load_file(path / "model.safetensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is double_quant
    suffix = ".weight.quant_state.bitsandbytes__fp4"
    prefixes = sorted(k[: -len(suffix)] for k in sd if k.endswith(suffix))
    assert len(prefixes) == 2 * 7 and not any(k.endswith("bitsandbytes__nf4") for k in sd)
    for prefix in prefixes:
        own = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".weight")}
        ref_sd = {k: v.numpy() for k, v in own.items()}
        assert R.quant_state(ref_sd)["dtype"] == "bfloat16"
        ours = torch.from_numpy(R.dequantize(ref_sd, "bfloat16")).to(torch.bfloat16)
        state = F.QuantState.from_dict({k[7:]: v for k, v in own.items() if k != "weight"}, device=torch.device("cpu"))
        theirs = F.dequantize_4bit(own["weight"], state)
        assert theirs.dtype == torch.bfloat16 and torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), prefix
        assert not torch.equal(ours, dense[prefix + ".weight"]) and torch.count_nonzero(ours) > ours.numel() // 2
        # quantize-on-load == the reference on the original bf16 weight (offset and CPU 8-bit table given)
        offset = R.quant_state(ref_sd).get("nested_offset")
        again = R.quantize(dense[prefix + ".weight"].float().numpy(), 64, double_quant, "bfloat16", offset=offset,
                           index=R.bnb_cpu_dynamic_index)  # fmt: skip
        assert set(again) == set(ref_sd)
        for key, value in again.items():
            assert np.array_equal(value.reshape(-1), ref_sd[key].reshape(-1)), (prefix, key)


@pytest.mark.compat
def test_eval_forward_then_save_writes_a_transposed_bf16_absmax(tmp_path):
    """§11.8 [V]: without double quantization, saving after one eval-mode forward on an AVX512-BF16 CPU
    writes absmax as bf16 of shape (in/G, out), the CPU layout, not float32 (B,): read back flat (row-major)
    it is in the wrong order whenever in > G, and the file dequantizes to a different weight."""
    torch, F = _torch(), _bnb()
    if not F.has_avx512bf16():
        pytest.skip("the CPU repacking only happens with AVX512-BF16")
    from safetensors.torch import load_file

    _, path = tiny_llama_4bit(tmp_path, "fp4", double_quant=False, eval_forward=True)
    good, bad = load_file(path / "model.safetensors"), load_file(path.parent / "fp4_after_eval" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"  # (64, 128): in / G = 2 blocks per row
    assert good[key + ".absmax"].dtype == torch.float32 and good[key + ".absmax"].shape == (128,)
    assert bad[key + ".absmax"].dtype == torch.bfloat16 and bad[key + ".absmax"].shape == (2, 64)
    assert torch.equal(good[key], bad[key])  # the packed codes survive
    assert torch.equal(bad[key + ".absmax"].float().T.reshape(-1), good[key + ".absmax"])  # transposed, lossless
    sds = [{k[len(key) - len("weight") :]: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in f.items() if k.startswith(key)} for f in (good, bad)]  # fmt: skip
    assert not np.array_equal(R.dequantize(sds[0]), R.dequantize(sds[1]))
