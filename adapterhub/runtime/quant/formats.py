"""The base-weight formats by name, and the one place that turns checkpoint tensors into a `BaseWeight`.

`load_base(..., quantize=<name>)` quantizes a dense checkpoint into the named format; a checkpoint saved
in a 4-bit format (its bitsandbytes quant_state key names the type) loads as saved whatever it says.
"""

from __future__ import annotations

from typing import Callable, Collection

import torch

from adapterhub.errors import ModelLoadError, QuantizationError
from adapterhub.runtime.quant.bnb_state import quant_types
from adapterhub.runtime.quant.dense import DenseWeight
from adapterhub.runtime.quant.fp4 import FP4Weight
from adapterhub.runtime.quant.nf4 import NF4Weight
from adapterhub.runtime.quant.weight import BaseWeight

FORMATS: dict[str, type] = {"dense": DenseWeight, "nf4": NF4Weight, "fp4": FP4Weight}
QUANTIZED = tuple(name for name, cls in FORMATS.items() if cls.is_quantized)


def format_class(name: str | None) -> type:
    """The class of a format name; None means dense."""
    cls = FORMATS.get(name or "dense")
    if cls is None:
        raise ModelLoadError(f"quantize={name!r} is not supported; use None or one of {list(QUANTIZED)}")
    return cls


def stored_weight(module: str, get: Callable[[str], torch.Tensor], names: Collection[str],
                  device: torch.device) -> BaseWeight | None:
    """The weight of `module` (its HF path) as a checkpoint stores it quantized (its bitsandbytes quant state
    names the format), or None when the checkpoint holds it dense. `names`: the tensors that exist."""
    prefix = module + "."
    stored = quant_types(names, prefix + "weight")
    if not stored:
        return None
    cls = FORMATS.get(stored[0]) if len(stored) == 1 else None
    if cls is None or not cls.is_quantized:
        raise ModelLoadError(f"{module} is stored as bitsandbytes {'/'.join(stored).upper()}; this runtime loads "
                             f"{', '.join(QUANTIZED).upper()} 4-bit checkpoints as saved")
    keys = [k for k in names if k.startswith(prefix + "weight")]
    try:
        return cls.from_state_dict({k: get(k).to(device) for k in keys}, prefix)
    except QuantizationError as error:
        raise ModelLoadError(f"the bitsandbytes 4-bit weight of {module} does not load: {error}") from error
