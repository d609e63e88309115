"""Base-weight formats: one protocol (weight.py), one file per format, one table of them (formats.py).

- ``weight.py``   ``BaseWeight``: matmul, dequantize, state_dict / from_state_dict, quantize, replaced_by
- ``dense.py``    ``DenseWeight``: unquantized, in the compute dtype
- ``fourbit.py``  ``FourBitWeight``: bitsandbytes' 4-bit layout with double quantization (``bnb_state.py``
                  reads its state dicts); ``nf4.py`` ``NF4Weight``, ``fp4.py`` ``FP4Weight`` name a codebook
- ``tables.py``   the formats' numbers, defined once
- ``formats.py``  format name -> class, and checkpoint tensors -> a weight

This package imports nothing itself: ``kernels`` reads ``quant.tables`` while the formats import ``kernels``.
"""
