"""NF4: bitsandbytes' 4-bit NormalFloat (`bnb_4bit_quant_type="nf4"`), bit-identical to `reference/nf4.py`.

The 16 values are quantiles of N(0, 1) scaled to [-1, 1] (QLoRA paper, Sec. 3; docs/semantics.md §1.1); a scaled value
takes the code of the nearest one, a value on a float32 midpoint the lower code (§1.2). Everything else
(blocks, double quantization, packing, the state dict) is quant/fourbit.py's. The device's Ops run NF4
through compiled CPU / CUDA kernels where they exist (kernels/cpu.py, kernels/cuda.py).
"""

from __future__ import annotations

from adapterhub.runtime.kernels import Codebook
from adapterhub.runtime.quant import tables
from adapterhub.runtime.quant.fourbit import FourBitWeight

# shift 21: the largest bucket size with at most one midpoint per bucket (kernels/codebook.py checks it)
NF4 = Codebook.by_midpoints("nf4", tables.NF4_CODE, shift=21)


class NF4Weight(FourBitWeight):
    format = "nf4"
    codebook = NF4
