"""Write the base, with whatever adapter is merged into it, as a Hugging Face checkpoint any engine loads.

Rules (docs/semantics.md §4.6):
- The merge is recomputed for export on dense weights in fp32, then rounded to the export dtype or quantized
  once: for a quantized base (NF4, FP4) from the weight it had before the merge, dequantized to fp32, never
  from the requantized merged weight (that would quantize twice). A dense base's merged weight is what the
  merge wrote (PEFT's rule: W + dW in fp32, rounded once to the compute dtype); export casts it.
- Unmerged layers are written as loaded: dense weights cast to the export dtype; a quantized weight whose
  format and dtype match the requested `quantize` / `dtype` keeps its exact bytes, else it is dequantized and
  written dense (or quantized from that).
- Files as transformers writes them: config.json (with quantization_config for a 4-bit export, read by
  transformers + bitsandbytes), generation_config.json, safetensors shards of at most `shard_size` with their
  index, tokenizer.json and tokenizer_config.json with the chat template.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from adapterhub.errors import ConfigError
from adapterhub.runtime.adapters.merge import merged_f32
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

    def to_json(self) -> dict:
        return {"path": str(self.path), "files": self.files, "bytes": sum(self.files.values()), "dtype": self.dtype,
                "quantize": self.quantize, "merged": self.merged, "seconds": round(self.seconds, 3)}


def export_checkpoint(base, path: str | Path, *, dtype: str | torch.dtype = "bfloat16", quantize: str | None = None,
                      shard_size: int | str = "5GB", progress: bool = False) -> ExportResult:
    """Write `base` (a runtime.Base) with its merged adapter, if any, to the checkpoint dir `path` (module docstring)."""
    started = time.perf_counter()
    dtype = _dtype(dtype)
    if quantize is not None and not formats.format_class(quantize).is_quantized:
        raise ConfigError(f"quantize={quantize!r} is not a quantized format; use None or one of {list(formats.QUANTIZED)}")
    path, max_bytes = Path(path), parse_size(shard_size)
    merged = base.pool.merged
    adapter = base.pool.adapter(merged.name) if merged is not None else None
    tensors = _export_state(base.model, merged, adapter, dtype, quantize, progress)
    config = base.config
    if quantize is not None:
        config = replace(config, quantization=QuantConfig(quant_type=quantize, use_double_quant=True,
                                                          compute_dtype=DTYPE_NAMES[dtype]))
    elif config.quantization is not None:
        config = replace(config, quantization=None)  # written dense: no quantization_config
    checkpoint.write_checkpoint(path, config, tensors, base.tokenizer, max_shard_bytes=max_bytes)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return ExportResult(path, files, DTYPE_NAMES[dtype], quantize, merged.name if merged else None,
                        time.perf_counter() - started)


def _export_state(model, merged, adapter, dtype: torch.dtype, quantize: str | None, progress: bool) -> dict:
    out, linears = {}, model.linears()
    for name, layer in tqdm(linears.items(), desc="export", unit="module", disable=not progress):
        out.update(_export_linear(name, layer, merged, adapter, dtype, quantize))
        if layer.bias is not None:
            out[name + ".bias"] = layer.bias.detach().to(dtype)
    is_tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linears and not (name == "lm_head.weight" and is_tied):
            out[name] = param.detach().to(dtype)
    return out


def _export_linear(name: str, layer, merged, adapter, dtype: torch.dtype, quantize: str | None) -> dict:
    """The checkpoint keys of one decoder linear (module docstring for the rules)."""
    weight, prefix = layer.weight, name + "."
    if merged is not None and name in merged.originals:  # quantized base: merge again on the weight before, in fp32
        module = adapter.modules()[name]
        A, B = torch.from_numpy(module.lora_A), torch.from_numpy(module.lora_B)
        W = merged_f32(merged.originals[name].dequantize(torch.float32), A, B, module)
    elif quantize == weight.format and getattr(weight, "dtype", None) == dtype:
        return weight.state_dict(prefix)  # the bytes as loaded: nothing to merge, nothing to redo
    else:
        W = weight.dequantize(torch.float32)
    if quantize is None:
        return {prefix + "weight": W.to(dtype)}
    return formats.format_class(quantize).quantize(W, dtype=dtype).state_dict(prefix)


def parse_size(size: int | str | None) -> int | None:
    """5GB / 500MB / 2GiB / 1000000 -> bytes (decimal units as transformers' max_shard_size); None: one file."""
    if size is None or isinstance(size, int):
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
