"""Reading a bitsandbytes / transformers 4-bit state dict (docs/semantics.md §3.1, §3.2), validated.

One module's keys, for a key prefix P (e.g. "model.layers.0.mlp.up_proj.weight"): P (packed uint8, or the
same bytes in another quant_storage dtype), P.absmax, P.quant_map, with double quantization
P.nested_absmax and P.nested_quant_map, and the JSON blob P.quant_state.bitsandbytes__<quant_type>.
"""

from __future__ import annotations

import json
from typing import Mapping

import torch

from adapterhub.errors import QuantizationError
from adapterhub.runtime.quant import tables

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
STATE_SUFFIX = ".quant_state.bitsandbytes__"  # + quant_type: the JSON blob key (§3.1)


def quant_types(sd: Mapping, prefix: str) -> list[str]:
    """The quant_type of every JSON blob key under `prefix` (a valid module has exactly one)."""
    start = prefix + STATE_SUFFIX
    return [k[len(start):] for k in sd if k.startswith(start)]


def single_prefix(sd: Mapping) -> str:
    """The key prefix of a state dict holding exactly one 4-bit weight."""
    prefixes = [k.split(STATE_SUFFIX)[0] for k in sd if STATE_SUFFIX in k]
    if len(prefixes) != 1:
        raise QuantizationError(f"expected exactly one '*{STATE_SUFFIX}<type>' key, found {len(prefixes)} "
                                f"({prefixes[:4]}); pass one module's keys, or name the prefix")
    return prefixes[0]


def parse(sd: Mapping, prefix: str, quant_type: str, code: torch.Tensor) -> dict:
    """Validated FourBitWeight fields from a packed bitsandbytes state dict with this key prefix."""
    state = _parse_json(sd, prefix, quant_type)
    shape = tuple(state["shape"])
    n = 1
    for d in shape:
        n *= d
    G = state["blocksize"]
    B = -(-n // G)
    packed = sd.get(prefix)
    if isinstance(packed, torch.Tensor) and packed.dtype != torch.uint8 and packed.is_contiguous():
        packed = packed.view(torch.uint8)  # quant_storage other than uint8: the same bytes (§1.4)
    packed = _tensor({prefix: packed} if packed is not None else {}, prefix, torch.uint8, (n + 1) // 2)
    quant_map = _tensor(sd, f"{prefix}.quant_map", torch.float32, 16)
    if not torch.equal(quant_map.cpu(), code):
        raise QuantizationError(f"'{prefix}.quant_map' is not the {quant_type} codebook (semantics §1.1, §11); "
                                "custom codebooks are not supported")
    fields = {"packed": packed.view(-1, 1), "shape": shape, "dtype": DTYPES[state["dtype"]], "blocksize": G}
    if "nested_offset" not in state:
        return {**fields, "absmax": _tensor(sd, f"{prefix}.absmax", torch.float32, B)}
    nested_blocksize = state.get("nested_blocksize")
    if state.get("nested_dtype") != "float32" or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise QuantizationError(
            f"'{prefix}': nested_dtype {state.get('nested_dtype')!r} / nested_blocksize {nested_blocksize!r} "
            "unsupported; a 'bfloat16' nested state comes from saving after an eval-mode forward on CPU "
            "(semantics §3.4): save in train mode")
    nested_map = _tensor(sd, f"{prefix}.nested_quant_map", torch.float32, 256)
    if not torch.equal(nested_map.cpu(), tables.DYNAMIC_CODE):
        raise QuantizationError(f"'{prefix}.nested_quant_map' is not the signed dynamic map (semantics §2.2)")
    return {
        **fields,
        "absmax": _tensor(sd, f"{prefix}.absmax", torch.uint8, B),
        "nested_absmax": _tensor(sd, f"{prefix}.nested_absmax", torch.float32, -(-B // nested_blocksize)),
        "offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=packed.device),
        "nested_blocksize": nested_blocksize,
    }


def _tensor(sd, key, dtype, numel):
    if key not in sd:
        raise QuantizationError(f"state dict lacks '{key}'; a bitsandbytes 4-bit weight needs it (semantics §3.1)")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
        got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
        raise QuantizationError(f"'{key}' must be {dtype} with {numel} elements, got {got}")
    return t.reshape(-1)


def _parse_json(sd, prefix, quant_type):
    found = quant_types(sd, prefix)
    if found != [quant_type]:
        raise QuantizationError(f"'{prefix}' needs exactly one quant_state key '{prefix}{STATE_SUFFIX}{quant_type}', "
                                f"found {[prefix + STATE_SUFFIX + t for t in found]}")
    key = prefix + STATE_SUFFIX + quant_type
    try:
        state = json.loads(bytes(sd[key].to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, AttributeError) as err:
        raise QuantizationError(f"'{key}' is not UTF-8 JSON bytes: {err}") from err
    shape = state.get("shape") if isinstance(state, dict) else None
    if (
        not isinstance(state, dict)
        or state.get("quant_type") != quant_type
        or state.get("blocksize") not in tables.BLOCKSIZES
        or state.get("dtype") not in DTYPES
        or not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise QuantizationError(
            f"'{key}' = {state} is not a {quant_type} quant state: need quant_type {quant_type!r}, blocksize in "
            f"{tables.BLOCKSIZES}, dtype in {sorted(DTYPES)} and a shape of positive ints")
    return state
