"""adapterhub: keep, ship and serve LoRA / QLoRA / DoRA adapters.

Public API (imported lazily so that ``import adapterhub`` and the registry never import torch):

- :class:`Registry`: the content-addressed adapter store (``adapterhub.registry``).
- :func:`load_base`: load a base model, NF4-quantized, with an adapter pool (``adapterhub.runtime``).
- :func:`train`: train a LoRA / QLoRA / DoRA adapter on a loaded base (``adapterhub.train``).
- :func:`combine`: weighted combination of adapters (linear, cat, TIES, DARE) into a new adapter.
- :class:`Adapter`, :class:`AdapterConfig`: a PEFT adapter in memory (``adapterhub.adapter``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Registry": "adapterhub.registry",
    "load_base": "adapterhub.runtime",
    "combine": "adapterhub.runtime",
    "train": "adapterhub.train",
    "Adapter": "adapterhub.adapter",
    "AdapterConfig": "adapterhub.adapter",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapterhub' has no attribute {name!r}")
