"""NF4 + double quantization, bit-identical to bitsandbytes (SEMANTICS.md §1-§3).

The public name of `adapterhub.runtime.nf4` (see there for semantics, shapes and speed notes):
`quantize(w, blocksize=64, double_quant=True) -> NF4Weight`, `dequantize(q_or_state_dict, dtype=None)`,
`NF4Weight.from_state_dict(sd, prefix)` / `.state_dict(prefix)`, and `dequantize_into(q, out, absmax)`.
"""

from adapterhub.runtime.nf4 import NF4Weight, dequantize, dequantize_into, quantize

__all__ = ["NF4Weight", "dequantize", "dequantize_into", "quantize"]
