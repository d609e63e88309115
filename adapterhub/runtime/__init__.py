"""The runtime: a base loaded once (dense or 4-bit), many LoRA / DoRA adapters in one batched forward, generation.

The layout is the architecture (each package's ``__init__`` lists its files):
- ``model/``     the Llama-family decoder and its files (config, KV cache, tokenizer, checkpoints, tiny)
- ``quant/``     base-weight formats behind one protocol: dense, NF4, ...
- ``adapters/``  per-row adapters on the base (the layer, the pool), merging, combining
- ``kernels/``   the hot-path ops, one ``Ops`` per device: torch, compiled CPU, CUDA
- ``generate.py`` sampling, the prefill / decode step API and ``generate``; ``base.py`` ``Base``, ``load_base``

Imports torch; never the registry or its on-disk layout (a caller passes a registry to ``Base.add_adapter``).
"""

from adapterhub.runtime.adapters.combine import combine
from adapterhub.runtime.base import Base, load_base

__all__ = ["Base", "combine", "load_base"]
