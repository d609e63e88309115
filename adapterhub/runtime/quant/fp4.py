"""FP4: bitsandbytes' 4-bit float (`bnb_4bit_quant_type="fp4"`), bit-identical to `reference/fp4.py` on CPU.

A sign bit over eight magnitudes (docs/semantics.md §11.1); a scaled value takes the code of the nearest
value, found through the float32 midpoints of the sorted table, a value on a midpoint going to the lower
entry (§11.2): so 0 has two codes, and s = 0 takes code 0 while 0 < s <= 1/384 takes code 8 (-0 sign bit,
value +0.0). Everything else (blocks, double quantization, packing, the state dict) is quant/fourbit.py's.
The compiled CPU kernels take any 16-value codebook, so FP4 decodes as fast as NF4 there; its quantize
(once, at load) and the CUDA path run the torch ops (kernels/ops.py).
"""

from __future__ import annotations

from adapterhub.runtime.kernels import Codebook
from adapterhub.runtime.quant import tables
from adapterhub.runtime.quant.fourbit import FourBitWeight

FP4 = Codebook.by_midpoints("fp4", tables.FP4_CODE, shift=21)


class FP4Weight(FourBitWeight):
    format = "fp4"
    codebook = FP4
