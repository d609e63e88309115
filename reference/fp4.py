"""FP4 4-bit quantization with double quantization, as bitsandbytes 0.50 stores it on CPU (docs/semantics.md §11).

The executable spec, with the conventions of reference/nf4.py (whose machinery it reuses: blocks, scaling,
packing, double quantization, the dynamic map, dtype rounding): every array is float32 (or uint8), a
bf16/fp16 weight is passed as its exact float32 values and named by `dtype`.
Shapes: n = number of weight elements, G = blocksize, B = ceil(n / G) blocks, B2 = ceil(B / 256).

quantize(w) -> state dict keyed like a bitsandbytes Linear4bit with prefix "weight" (§11.6):
  "weight" uint8 ((n+1)//2, 1) packed codes     "weight.absmax" float32 (B,) | uint8 (B,) with DQ
  "weight.quant_map" float32 (16,) = FP4_CODE   "weight.nested_absmax" float32 (B2,)       (DQ only)
  "weight.nested_quant_map" float32 (256,) (DQ) "weight.quant_state.bitsandbytes__fp4" uint8 JSON
dequantize(sd) -> float32 array of the original shape (§11.7).

FP4 is a sign bit (bit 3) over 8 magnitudes 0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4 (bits 2..0, §11.1); the
value 0 has two codes, 0 and 8, both stored as +0.0. bnb's CPU/default path sorts the table and picks the
nearest entry by float32 midpoints, a value on a midpoint taking the lower (more negative) entry (§11.2).
So 0 < s <= 1/384 gets code 8 (sign bit set) while -1/384 < s <= 0 gets code 0: near 0 the sign bit of a
code is not the sign of the value. Zero blocks and the odd-n padding nibble are code 0 (§11.3, §11.4).

Known backend deviations (§11.8, §11.9): CUDA picks codes by sign + magnitude with rounded literal thresholds,
so its bytes differ near 0 (codes 0 / 8 swapped) and within 14 ulp of some midpoints; bnb's native CPU dequantize
kernel writes -0.0 for code 8 on its scalar path (even last dim, not a multiple of 16) and has the per-row
absmax bug of §1.5 (last dim a multiple of 16 but not of G). The tail-block division (bnb divides, we multiply
by the reciprocal) and the double-quant deviations are those of reference/nf4.py.
"""

import numpy as np

from reference import nf4

# re-exported: the same blocksizes, dynamic map, 8-bit index rules, blob parser, unpacking and dtype rounding
from reference.nf4 import (  # noqa: F401
    BLOCKSIZES, DYNAMIC_CODE, bnb_cpu_dynamic_index, nearest_dynamic_index, quant_state, round_to, unpack,
)  # fmt: skip

STATE_KEY = "weight.quant_state.bitsandbytes__fp4"  # §11.6

# §11.1: the FP4 codebook, index = 4-bit code (bit 3 = sign); float32 x / 12 of 0, .0625, 8, 12, 4, 6, 2, 3.
FP4_CODE = nf4._table(  # raises if the SHA-256 does not match
    "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000 "
    "00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000",
    "b830bcf8857895e5676b8e2ce608a60bb8af9b3ce6270073e9de34814196f09c",
)
# §11.2: FP4_CODE[FP4_ORDER] is ascending (a stable argsort: of the two zeros, code 0 comes first).
FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
# §11.2: sorted position = number of float32 midpoints strictly below s; the middle one is 0.0 (0 between 0 and 0).
FP4_MIDPOINTS = (FP4_CODE[FP4_ORDER[:-1]] + FP4_CODE[FP4_ORDER[1:]]) / np.float32(2)
ZERO_CODE = int(FP4_ORDER[7])  # the code of s = 0 (and -0): zero blocks, odd-n padding (§11.3, §11.4)
if not (np.all(np.diff(FP4_CODE[FP4_ORDER]) >= 0) and ZERO_CODE == 0 and FP4_MIDPOINTS[7] == 0):
    raise RuntimeError("reference/fp4.py: FP4_ORDER does not sort FP4_CODE (docs/semantics.md §11.2)")


def fp4_codes(x, G):
    """(n,) float32 -> codes uint8 (n,), absmax float32 (B,): s = clamp(x * (1 / max(a, 1e-38)), -1, 1),
    code = FP4_ORDER[number of FP4_MIDPOINTS strictly below s] (§11.2). Zero blocks give code 0 (§11.3)."""
    return nf4.codes_from_midpoints(x, G, FP4_MIDPOINTS, FP4_ORDER)


def quantize(w, blocksize=64, double_quant=True, dtype="float32", offset=None, index=nearest_dynamic_index):
    """Weight (any shape, n > 0) -> bitsandbytes-keyed FP4 state dict (module docstring, §11.2-§11.6).
    Double quantization is NF4's, unchanged (§11.5): offset=None uses the NumPy float32 mean (may be a few
    ulp from torch's); `index` picks the 8-bit index (bnb_cpu_dynamic_index emulates bnb's CPU table)."""
    return nf4.quantize_4bit(w, "fp4", FP4_CODE, fp4_codes, ZERO_CODE, blocksize, double_quant, dtype, offset, index)


def dequantize(sd, dtype=None):
    """FP4 state dict -> weight of the original shape (§11.7): float32 FP4_CODE[q] * absmax[j // G] (absmax
    from double quantization as in nf4.dequantize_absmax), then, if `dtype` is given ("bfloat16" |
    "float16" | "float32"), rounded to nearest even (bf16 as float32 values). Code 8 gives +0.0."""
    if STATE_KEY not in sd or quant_state(sd)["quant_type"] != "fp4":
        raise ValueError("not an FP4 state dict (docs/semantics.md §11.6)")
    quant_map = np.asarray(sd["weight.quant_map"], dtype=np.float32)  # (16,)
    if not np.array_equal(quant_map.view(np.uint32), FP4_CODE.view(np.uint32)):
        raise ValueError("weight.quant_map is not the FP4 codebook (docs/semantics.md §11.1)")
    return nf4.dequantize(sd, dtype)
