"""NF4 4-bit quantization with double quantization, as bitsandbytes 0.50 stores it (docs/semantics.md §1-3).

The executable spec: every array is float32 (or uint8) and every rounding is the float32 one the
format defines. A bf16/fp16 weight is passed as its exact float32 values and named by `dtype`.
Shapes: n = number of weight elements, G = blocksize, B = ceil(n / G) blocks, B2 = ceil(B / 256).

quantize(w) -> state dict keyed like a bitsandbytes Linear4bit with prefix "weight" (§3.1):
  "weight" uint8 ((n+1)//2, 1) packed codes     "weight.absmax" float32 (B,) | uint8 (B,) with DQ
  "weight.quant_map" float32 (16,)              "weight.nested_absmax" float32 (B2,)       (DQ only)
  "weight.nested_quant_map" float32 (256,) (DQ) "weight.quant_state.bitsandbytes__nf4" uint8 JSON
dequantize(sd) -> float32 array of the original shape (§1.5).

Known backend deviations: bitsandbytes' CPU kernel picks the 8-bit double-quant index through a
65 536-bin table (§2.3); this reference picks the exact nearest entry (ties to the lower index), like
CUDA up to ties. `bnb_cpu_dynamic_index` emulates the CPU table for bit-equality tests on a CPU
(except a nested block of zeros, where the CPU kernel stores index 0). bitsandbytes' torch path also
stores 1e-38, not 0, as the absmax of an all-zero *tail* block (its clamped divisor); both decode to 0.
"""

import hashlib
import json

import numpy as np

from reference import bf16

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # §1.3
NESTED_BLOCKSIZE = 256  # §2.1
DTYPES = ("float32", "bfloat16", "float16")
_STATE_PREFIX = "weight.quant_state.bitsandbytes__"  # + quant_type (§3.1)
STATE_KEY = _STATE_PREFIX + "nf4"
ZERO_CODE = 7  # NF4 code of 0.0: odd-n padding nibble, all-zero blocks (§1.3, §1.4)
_MIN_DIVISOR = np.float32(1e-38)  # bnb divides by absmax.clamp(min=1e-38) (§1.2)


def _table(hex_words, sha256):
    values = np.array([int(h, 16) for h in hex_words.split()], dtype=np.uint32).view(np.float32)
    if hashlib.sha256(values.astype("<f4").tobytes()).hexdigest() != sha256:
        raise RuntimeError(f"reference: a hardcoded table does not match its SHA-256 {sha256} (semantics §1.1/§2.2/§11.1)")
    return values


# §1.1: the NF4 codebook, index = 4-bit code.
NF4_CODE = _table(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000",
    "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a",
)
# §1.2: code = number of float32 midpoints strictly below s (a value on a midpoint takes the lower code).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)

# §2.2: the signed 8-bit dynamic map of double quantization (index 127 = 0.0, index 255 = 1.0).
DYNAMIC_CODE = _table(
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 "
    "bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a "
    "bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 "
    "bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334 "
    "bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d "
    "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 "
    "bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d "
    "ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 "
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d "
    "3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 "
    "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d "
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334 "
    "3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 "
    "3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a "
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333 "
    "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000",
    "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
)


def _exact_thresholds(code):
    """float32 t_i with (s > t_i) <=> (s > exact midpoint) for every float32 s: the exact (float64)
    midpoint rounded down. So "count of t_i strictly below s" is the exact nearest entry, ties lower."""
    mid = (code[:-1].astype(np.float64) + code[1:]) / 2  # exact: neighbours are within 2^29 of each other
    t = mid.astype(np.float32)
    return np.where(t.astype(np.float64) > mid, np.nextafter(t, np.float32(-np.inf)), t)


# §2.3: 54 of the 255 float32-computed midpoints of the dynamic map round up; these do not.
DYNAMIC_THRESHOLDS = _exact_thresholds(DYNAMIC_CODE)


def _blocks(x, G):
    """(n,) float32 -> (B, G) zero-padded blocks and absmax (B,): zeros never change a max (§1.3)."""
    B = -(-x.size // G)
    blocks = np.zeros((B, G), dtype=np.float32)
    blocks.reshape(-1)[: x.size] = x
    return blocks, np.abs(blocks).max(axis=1)


def _scaled(blocks, absmax):
    """(B, G), (B,) -> s = clamp(x * (1 / max(a, 1e-38)), -1, 1) in float32 (§1.2)."""
    recip = np.float32(1) / np.maximum(absmax, _MIN_DIVISOR)  # (B,)
    return np.clip(blocks * recip[:, None], np.float32(-1), np.float32(1))


def codes_from_midpoints(x, G, midpoints, order=None):
    """(n,) float32 -> codes uint8 (n,), absmax float32 (B,): code = order[number of `midpoints` (ascending,
    float32) strictly below s] (§1.2); `order` maps sorted position -> code, None = identity. Shared with FP4."""
    blocks, absmax = _blocks(x, G)
    s = _scaled(blocks, absmax)
    pos = np.searchsorted(midpoints, s.reshape(-1), side="left")
    codes = (pos if order is None else np.asarray(order)[pos]).astype(np.uint8)
    return codes[: x.size], absmax


def nf4_codes(x, G):
    """(n,) float32 -> codes uint8 (n,), absmax float32 (B,). Zero blocks give code 7 (§1.3)."""
    return codes_from_midpoints(x, G, NF4_MIDPOINTS)


def nearest_dynamic_index(s):
    """(m,) float32 in [-1, 1] -> uint8 index of the exact nearest DYNAMIC_CODE entry, ties lower."""
    return np.searchsorted(DYNAMIC_THRESHOLDS, s, side="left").astype(np.uint8)


def bnb_cpu_dynamic_index(s):
    """(m,) float32 -> uint8 index as bitsandbytes' CPU kernel picks it (§2.3): s is clamped to
    [-1, 1] and put in one of 65 536 uniform bins, bin = trunc((s + 1) * 0.5 * 65535 + 0.5); each bin
    maps to the entry nearest its centre (bin / 65535 * 2 - 1). Not the spec: for bit tests only."""
    pos = (np.clip(s, -1, 1).astype(np.float32) + np.float32(1)) * np.float32(0.5) * np.float32(65535)
    bins = (pos + np.float32(0.5)).astype(np.int64)
    centres = (np.arange(65536, dtype=np.float64) / 65535 * 2 - 1).astype(np.float32)
    return nearest_dynamic_index(centres)[bins]


def pack(codes, pad=ZERO_CODE):
    """(n,) codes 0..15 -> uint8 ((n+1)//2, 1): element 2k in the high nibble, odd n padded with `pad`,
    the code of 0.0 (7 for NF4, §1.4)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def unpack(packed, n):
    """uint8 ((n+1)//2, 1) -> codes uint8 (n,)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    return np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]


def double_quantize(absmax, offset=None, index=nearest_dynamic_index):
    """§2.1: absmax float32 (B,) -> q8 uint8 (B,), nested_absmax float32 (B2,), offset float32.
    offset=None: the NumPy float32 mean (may be 1 ulp from torch's, §2.1); given: used as is."""
    offset = np.float32(absmax.mean(dtype=np.float32) if offset is None else offset)
    d = (absmax - offset).astype(np.float32)
    blocks, nested_absmax = _blocks(d, NESTED_BLOCKSIZE)
    q8 = index(_scaled(blocks, nested_absmax).reshape(-1))[: d.size]
    return q8, nested_absmax, offset


def quantize(w, blocksize=64, double_quant=True, dtype="float32", offset=None, index=nearest_dynamic_index):
    """Weight (any shape, n > 0) -> bitsandbytes-keyed state dict (module docstring, §1-§3.1).
    `dtype` names the original dtype; `index` picks the 8-bit index (bnb_cpu_dynamic_index on CPU)."""
    return quantize_4bit(w, "nf4", NF4_CODE, nf4_codes, ZERO_CODE, blocksize, double_quant, dtype, offset, index)


def quantize_4bit(w, quant_type, code, codes_fn, pad, blocksize, double_quant, dtype, offset, index):
    """The body of `quantize`, shared with reference/fp4.py: codes_fn(x, G) -> codes (n,), absmax (B,);
    `code` is the stored quant_map (16,), `pad` the odd-n nibble, `quant_type` names the blob and its key."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} not in {BLOCKSIZES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {DTYPES}")
    w = np.asarray(w)
    x = w.astype(np.float32).reshape(-1)  # row-major flatten (§1.3)
    if x.size == 0:
        raise ValueError("cannot quantize an empty weight")
    codes, absmax = codes_fn(x, blocksize)
    sd = {"weight": pack(codes, pad), "weight.quant_map": code.copy()}
    state = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(w.shape)}
    if double_quant:
        q8, nested_absmax, offset = double_quantize(absmax, offset, index)
        sd["weight.absmax"] = q8
        sd["weight.nested_absmax"] = nested_absmax
        sd["weight.nested_quant_map"] = DYNAMIC_CODE.copy()
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(offset))
    else:
        sd["weight.absmax"] = absmax
    sd[_STATE_PREFIX + quant_type] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()  # §3.1
    return sd


def quant_state(sd):
    """The parsed JSON blob of a state dict (§3.1): its "weight.quant_state.bitsandbytes__<nf4|fp4>" key."""
    key = next((k for k in sd if k.startswith(_STATE_PREFIX)), STATE_KEY)
    return json.loads(bytes(np.asarray(sd[key], dtype=np.uint8)).decode("utf-8"))


def dequantize_absmax(sd):
    """Per-block absmax float32 (B,); with DQ fl32(fl32(code8[q8] * nested[i // 256]) + offset) (§2.1.5)."""
    if "weight.nested_absmax" not in sd:
        return np.asarray(sd["weight.absmax"], dtype=np.float32)
    state = quant_state(sd)
    q8 = np.asarray(sd["weight.absmax"], dtype=np.uint8)
    code8 = np.asarray(sd["weight.nested_quant_map"], dtype=np.float32)
    nested = np.repeat(np.asarray(sd["weight.nested_absmax"], dtype=np.float32), state["nested_blocksize"])
    return code8[q8] * nested[: q8.size] + np.float32(state["nested_offset"])


def dequantize(sd, dtype=None):
    """State dict -> weight of the original shape (§1.5): float32 code[q] * absmax[j // G], then, if
    `dtype` is given ("bfloat16" | "float16" | "float32"), rounded to it (bf16 as float32 values)."""
    state = quant_state(sd)
    n = int(np.prod(state["shape"]))
    codes = unpack(sd["weight"], n)
    absmax = np.repeat(dequantize_absmax(sd), state["blocksize"])[:n]
    out = (np.asarray(sd["weight.quant_map"], dtype=np.float32)[codes] * absmax).reshape(state["shape"])
    return out if dtype is None else round_to(out, dtype)


def round_to(x, dtype):
    """float32 -> the dtype's nearest-even values: float32 array for bf16, float16 array for fp16."""
    if dtype == "bfloat16":
        return bf16.round_to_bf16(x)
    return np.asarray(x, dtype=np.float32).astype(np.float16 if dtype == "float16" else np.float32)
