"""Write the base, with whatever adapter is merged into it, as a Hugging Face checkpoint any engine loads.

Rules (docs/semantics.md §4.6):
- The merge is recomputed for export on dense weights in fp32, then rounded to the export dtype or quantized
  once: for a quantized base (NF4, FP4) from the weight it had before the merge, dequantized to fp32, never
  from the requantized merged weight (that would quantize twice). A dense base's merged weight is what the
  merge wrote (PEFT's rule: W + dW in fp32, rounded once to the compute dtype); export casts it.
- Unmerged layers are written as loaded: dense weights cast to the export dtype; a quantized weight whose
  format and dtype match the requested `quantize` / `dtype` keeps its exact bytes, else it is dequantized and
  written dense (or quantized from that).
- The result states, per merged module, how much of the adapter's delta the written weights keep:
  ||(written - W) - dW|| / ||dW|| against the fp32 merge (semantics §4.6), worst and mean, and warns past
  merge.DELTA_WARN (a 4-bit export of a small adapter can lose most of it).
- Files as transformers writes them: config.json (with quantization_config for a 4-bit export, read by
  transformers + bitsandbytes), generation_config.json, safetensors shards of at most `shard_size` with their
  index, tokenizer.json and tokenizer_config.json with the chat template.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from adapterhub.errors import ConfigError
from adapterhub.runtime.adapters import lora_math
from adapterhub.runtime.adapters.merge import DELTA_WARN, delta_error, merged_delta_norm, module_merged_f32
from adapterhub.runtime.model import checkpoint
from adapterhub.runtime.model.config import QuantConfig
from adapterhub.runtime.quant import formats
from adapterhub.runtime.quant.bnb_state import DTYPE_NAMES, DTYPES

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    files: dict[str, int]  # file name -> bytes
    dtype: str
    quantize: str | None
    merged: str | None  # the adapter merged into the export, if any
    seconds: float
    delta_error_max: float = 0.0  # of the written weights against the fp32 merge (module docstring)
    delta_error_mean: float = 0.0

    @property
    def warning(self) -> str | None:
        if self.delta_error_max <= DELTA_WARN:
            return None
        kind = f"in {self.quantize}" if self.quantize else f"in {self.dtype}"
        return (f"the checkpoint holds {self.merged!r} only approximately: written {kind}, the merged delta is off by "
                f"{self.delta_error_max:.0%} of the adapter's own (mean {self.delta_error_mean:.0%}); export in "
                "float32 or bfloat16, or serve the adapter unmerged")

    def to_json(self) -> dict:
        return {"path": str(self.path), "files": self.files, "bytes": sum(self.files.values()), "dtype": self.dtype,
                "quantize": self.quantize, "merged": self.merged, "seconds": round(self.seconds, 3),
                "delta_error_max": self.delta_error_max, "delta_error_mean": self.delta_error_mean,
                "warning": self.warning}


def export_checkpoint(base, path: str | Path, *, dtype: str | torch.dtype = "bfloat16", quantize: str | None = None,
                      shard_size: int | str = "5GB", progress: bool = False) -> ExportResult:
    """Write `base` (a runtime.Base) with its merged adapter, if any, to the checkpoint dir `path` (see the
    module docstring)."""
    started = time.perf_counter()
    dtype = _dtype(dtype)
    if quantize is not None and quantize not in formats.QUANTIZED:
        raise ConfigError(f"quantize={quantize!r} is not a quantized format; use None or one of "
                          f"{list(formats.QUANTIZED)}")
    path, max_bytes = Path(path), parse_size(shard_size)
    merged = base.pool.merged
    adapter = base.pool.adapter(merged.name) if merged is not None else None
    tensors, deltas = _export_state(base.model, merged, adapter, dtype, quantize, progress)
    config = base.config
    if quantize is not None:
        config = replace(config, quantization=QuantConfig(quant_type=quantize, use_double_quant=True,
                                                          compute_dtype=DTYPE_NAMES[dtype]))
    elif config.quantization is not None:
        config = replace(config, quantization=None)  # written dense: no quantization_config
    checkpoint.write_checkpoint(path, config, tensors, base.tokenizer, max_shard_bytes=max_bytes)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    result = ExportResult(path, files, DTYPE_NAMES[dtype], quantize, merged.name if merged else None,
                          time.perf_counter() - started, max(deltas, default=0.0), sum(deltas) / max(len(deltas), 1))
    if result.warning:
        warnings.warn(result.warning, stacklevel=3)
    return result


def _export_state(model, merged, adapter, dtype: torch.dtype, quantize: str | None, progress: bool):
    """(checkpoint tensors, delta errors of the merged modules)."""
    out, deltas, linears = {}, [], model.linears()
    for name, layer in tqdm(linears.items(), desc="export", unit="module", disable=not progress):
        module = adapter.modules().get(name) if adapter is not None else None
        tensors, delta = _export_linear(name, layer, merged, module, dtype, quantize)
        out.update(tensors)
        if delta is not None:
            deltas.append(delta)
        if layer.bias is not None:
            out[name + ".bias"] = layer.bias.detach().to(dtype)
    is_tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linears and not (name == "lm_head.weight" and is_tied):
            out[name] = param.detach().to(dtype)
    return out, deltas


def _export_linear(name: str, layer, merged, module, dtype: torch.dtype, quantize: str | None):
    """(checkpoint keys of one decoder linear, its delta error when the merged adapter targets it)."""
    weight, prefix = layer.weight, name + "."
    if module is None and quantize == weight.format and getattr(weight, "dtype", None) == dtype:
        return weight.state_dict(prefix), None  # the bytes as loaded: nothing to merge, nothing to redo
    if module is None:
        W = weight.dequantize(dtype if quantize is None else torch.float32)
        return _written(prefix, W, dtype, quantize)[0], None
    A, B = torch.from_numpy(module.lora_A), torch.from_numpy(module.lora_B)
    if name in merged.originals:  # quantized base: merge again on the weight before, in fp32
        before = merged.originals[name].dequantize(torch.float32)
        W = module_merged_f32(before, A, B, module)[0]
    elif quantize is None and dtype in (weight.dequantize().dtype, torch.float32):  # dense, as the merge rounded it
        return {prefix + "weight": weight.dequantize(dtype)}, merged.deltas[name]
    else:  # dense base: the merged weight as the merge rounded it; the weight before, recomputed for DoRA
        W = weight.dequantize(torch.float32)
        if W is weight.dequantize():  # an fp32 base's own tensor: delta_error below overwrites its argument
            W = W.clone()
        before = _unmerged_f32(W, A, B, module, merged.norms.get(name)) if module.magnitude is not None else None
    tensors, written = _written(prefix, W, dtype, quantize)
    return tensors, delta_error(W, written, merged_delta_norm(before, W, A, B, module))


def _written(prefix: str, W: torch.Tensor, dtype: torch.dtype, quantize: str | None):
    """(checkpoint tensors of weight W, W as the checkpoint holds it)."""
    if quantize is None:
        written = W.to(dtype)
        return {prefix + "weight": written}, written
    q = formats.format_class(quantize).quantize(W, dtype=dtype)
    return q.state_dict(prefix), q.dequantize(torch.float32)


def _unmerged_f32(W: torch.Tensor, A, B, module, norm: torch.Tensor | None) -> torch.Tensor:
    """The weight before a dense DoRA merge, recomputed in fp32 (semantics §5.4: W' n / m - dW)."""
    return lora_math.unmerge_dora(W, A, B, module.scaling, torch.from_numpy(module.magnitude), norm)


def parse_size(size: int | str | None) -> int | None:
    """5GB / 500MB / 2GiB / 1000000 -> bytes (decimal units as transformers' max_shard_size); None: one file."""
    if size is None or (isinstance(size, int) and size > 0):  # 0 / negative: refused below
        return size
    match = _SIZE.fullmatch(str(size))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"shard size {size!r} is not a size; write e.g. '5GB', '500MB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower() or None])


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    names = {**DTYPES, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    resolved = dtype if isinstance(dtype, torch.dtype) else names.get(str(dtype).removeprefix("torch."))
    if resolved not in DTYPE_NAMES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {sorted(names)}")
    return resolved
