"""reference/nf4.py against the golden values of docs/semantics.md §1-§3 and independent computations."""

import hashlib
import json

import numpy as np
import pytest

from reference import bf16
from reference import nf4 as R

# semantics §1.2, copied as decimal literals (independent of the hex table in reference/nf4.py).
MIDPOINTS = [
    -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
    0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
    0.5016634464263916, 0.6427869200706482, 0.8614784479141235,
]  # fmt: skip


def sha(values):
    return hashlib.sha256(np.asarray(values, dtype="<f4").tobytes()).hexdigest()


def test_codebook_and_dynamic_map_golden():
    assert sha(R.NF4_CODE) == "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
    assert R.NF4_CODE[0] == -1.0 and R.NF4_CODE[7] == 0.0 and R.NF4_CODE[15] == 1.0
    assert R.NF4_MIDPOINTS.tolist() == np.float32(MIDPOINTS).tolist()
    code8 = R.DYNAMIC_CODE
    assert sha(code8) == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    assert code8[127] == 0.0 and code8[255] == 1.0 and code8[0] == np.float32(-0.99296875)
    assert np.all(np.diff(code8) > 0) and (code8 > 0).sum() == 128 and (code8 < 0).sum() == 127
    assert abs(code8[128] - 5.5e-7) < 1e-13  # the smallest positive value (§2.2)


def test_packing_examples():
    assert R.pack(np.arange(16)).reshape(-1).tobytes() == bytes.fromhex("0123456789abcdef")
    sd = R.quantize(np.float32([1.0, -1.0, 0.5]), double_quant=False)
    assert sd["weight"].reshape(-1).tobytes() == bytes([0xF0, 0xC7])  # odd n: low nibble 7
    assert R.dequantize(sd).tolist() == [1.0, -1.0, R.NF4_CODE[12]]


def test_midpoint_ties_take_the_lower_code():
    t = np.float32(MIDPOINTS)
    up = np.nextafter(t, np.float32(2))
    w = np.concatenate([[1.0], t, up]).astype(np.float32)  # absmax 1 -> s = x exactly
    codes = R.unpack(R.quantize(w, blocksize=32, double_quant=False)["weight"], w.size)
    assert codes[1:16].tolist() == list(range(15))
    assert codes[16:].tolist() == list(range(1, 16))


def test_shape_tail_and_zero_block():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 64)).astype(np.float32)
    sd = R.quantize(w, blocksize=64, double_quant=False)
    assert sd["weight"].shape == (64, 1) and sd["weight"].dtype == np.uint8
    row1 = R.quantize(w[1:], blocksize=64, double_quant=False)
    assert np.array_equal(sd["weight"][32:], row1["weight"])  # byte 32 starts row 1
    w = rng.standard_normal(65 + 64).astype(np.float32)
    w[64:128] = 0.0  # an all-zero block in the middle; the tail block is w[128] alone
    sd = R.quantize(w, blocksize=64, double_quant=False)
    assert sd["weight"].shape == (65, 1)
    assert sd["weight.absmax"].tolist() == [np.abs(w[:64]).max(), 0.0, abs(w[128])]
    assert np.all(sd["weight"][32:64] == 0x77)
    assert sd["weight"][64, 0] & 15 == 7  # odd n padding
    assert sd["weight"][64, 0] >> 4 == (15 if w[128] > 0 else 0)  # a lone tail element is +-its absmax
    assert np.all(R.dequantize(sd)[64:128] == 0)


def test_json_blob_exact():
    w = np.ones((64, 64), dtype=np.float32)
    sd = R.quantize(w, dtype="bfloat16", offset=np.float32(0.05495452880859375))
    expected = (
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64], "nested_blocksize": 256, '
        '"nested_dtype": "float32", "nested_offset": 0.05495452880859375}'
    )
    assert bytes(sd[R.STATE_KEY]) == expected.encode()
    assert set(sd) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", R.STATE_KEY,
    }  # fmt: skip
    plain = R.quantize(w, blocksize=128, double_quant=False)
    assert json.loads(bytes(plain[R.STATE_KEY])) == {"quant_type": "nf4", "blocksize": 128, "dtype": "float32", "shape": [64, 64]}


def test_nearest_dynamic_index_is_exact_nearest_ties_lower():
    rng = np.random.default_rng(1)
    code = R.DYNAMIC_CODE.astype(np.float64)
    mids = (code[:-1] + code[1:]) / 2
    s = np.concatenate([rng.uniform(-1, 1, 4000), rng.normal(0, 1e-5, 4000), mids]).astype(np.float32)
    s = np.concatenate([s, np.nextafter(s, np.float32(2)), np.nextafter(s, np.float32(-2))]).clip(-1, 1)
    got = R.nearest_dynamic_index(s).astype(np.int64)
    dist = np.abs(s.astype(np.float64)[:, None] - code[None, :])
    assert np.array_equal(got, np.argmin(dist, axis=1))  # argmin takes the first (lower) index on ties
    assert R.nearest_dynamic_index(np.float32([0.0]))[0] == 127


def test_bnb_cpu_table_is_off_near_zero():
    """§2.3: the CPU table's bins (3e-5) are coarser than the codes near zero: 0.0 is not coded 127."""
    assert R.bnb_cpu_dynamic_index(np.float32([0.0]))[0] != 127
    s = np.linspace(-1, 1, 20001, dtype=np.float32)
    agree = R.bnb_cpu_dynamic_index(s) == R.nearest_dynamic_index(s)
    assert 0.99 < agree.mean() < 1.0


def test_double_quant_absmax_formula():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(64 * 600).astype(np.float32) * np.repeat(rng.uniform(0.1, 3, 600), 64).astype(np.float32)
    sd = R.quantize(w, double_quant=True)
    plain = R.quantize(w, double_quant=False)
    assert np.array_equal(sd["weight"], plain["weight"])  # §2.1.1: codes identical with or without DQ
    true = plain["weight.absmax"]
    offset = np.float32(R.quant_state(sd)["nested_offset"])
    assert offset == true.mean(dtype=np.float32)
    nested = sd["weight.nested_absmax"]
    assert nested.shape == (3,) and nested.tolist() == [np.abs(true[i : i + 256] - offset).max() for i in (0, 256, 512)]
    got = R.dequantize_absmax(sd)
    expect = (R.DYNAMIC_CODE[sd["weight.absmax"]] * np.repeat(nested, 256)[:600]).astype(np.float32) + offset
    assert np.array_equal(got, expect)
    # exact nearest: error at most half the widest gap of the dynamic map, times the nested absmax
    half_gap = np.diff(R.DYNAMIC_CODE.astype(np.float64)).max() / 2
    assert np.all(np.abs(got - true) <= half_gap * np.repeat(nested, 256)[:600] * (1 + 1e-6) + 1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_rounding_to_dtype(dtype):
    rng = np.random.default_rng(3)
    w = R.round_to(rng.standard_normal((5, 40)).astype(np.float32), dtype).astype(np.float32)
    sd = R.quantize(w, blocksize=32, dtype=dtype)
    exact = R.dequantize(sd)
    assert exact.dtype == np.float32 and exact.shape == (5, 40)
    rounded = R.dequantize(sd, dtype)
    if dtype == "bfloat16":
        assert np.array_equal(rounded, bf16.round_to_bf16(exact))
    else:
        assert np.array_equal(rounded, exact.astype(rounded.dtype))
    assert np.abs(exact - w).max() > 0  # quantization is lossy: the test is not vacuous
    absmax = R.quantize(w, blocksize=32, double_quant=False)["weight.absmax"]
    assert np.array_equal(absmax, R.round_to(absmax, dtype).astype(np.float32))  # §1.3: a dtype value


def test_invalid_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        R.quantize(np.ones(64, np.float32), blocksize=48)
    with pytest.raises(ValueError, match="dtype"):
        R.quantize(np.ones(64, np.float32), dtype="int8")
    with pytest.raises(ValueError, match="empty"):
        R.quantize(np.ones((0, 4), np.float32))
