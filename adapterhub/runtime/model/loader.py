"""Base model weights in: a Hugging Face dir, a hub id from the local HF cache, or the embedded tiny model.

The model is built on the meta device; each decoder projection is then swapped for a real `AdapterLinear`
holding its loaded weight in the asked format (quant/formats.py), and the rest (embeddings, norms,
lm_head) get storage once and are filled from the file: every tensor is read once and never held twice
(the gpt-fast "build, then swap in" order). A transformers + bitsandbytes 4-bit checkpoint (semantics
§3.1/§3.2) loads as saved; `save_quantized` writes that same format, so the next load skips quantizing.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
from pathlib import Path
from typing import Callable

import torch

from adapterhub.base_identity import BaseIdentity, identity_of
from adapterhub.errors import ConfigError, ModelLoadError
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.model import checkpoint, tiny
from adapterhub.runtime.model.config import ModelConfig, QuantConfig
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.runtime.model.model import Transformer
from adapterhub.runtime.model.tokenizer import Tokenizer
from adapterhub.runtime.quant import formats


def build_model(config: ModelConfig, get: Callable[[str], torch.Tensor], names, *, quantize: str | None,
                dtype: torch.dtype, device) -> Transformer:
    """A Transformer whose weights come from `get(name)`; `names` are the names the source holds."""
    formats.format_class(quantize)  # an unknown format fails before anything is read
    names, device = set(names), torch.device(device)
    model = Transformer(config, dtype=dtype, device="meta")
    for name, meta in model.projections().items():
        shape = (meta.out_features, meta.in_features)
        weight = formats.stored_weight(name, get, names, device)  # a 4-bit checkpoint loads as saved
        if weight is None:
            W = checkpoint.checked(get, names, name + ".weight", shape).to(device)
            weight = formats.format_class(quantize).quantize(W, dtype=dtype)
        elif tuple(weight.shape) != shape:
            raise ModelLoadError(f"{name}'s stored weight has shape {list(weight.shape)} but config.json implies "
                                 f"{list(shape)}")
        bias = checkpoint.checked(get, names, name + ".bias", (meta.out_features,)) if meta.bias is not None else None
        model.set_submodule(name, AdapterLinear(weight, bias, dtype=dtype))
    model.materialize(device)
    projections = set(model.projections())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[0] in projections or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            source = checkpoint.checked(get, names, name, tuple(param.shape))
            param.copy_(source)
            _release_file_pages(source)
    return model.eval()


# Below this size a tensor's file pages are not worth a look at /proc/self/maps (norm weights).
RELEASE_MIN_BYTES = 1 << 20
MADV_DONTNEED = 4  # Linux


def _release_file_pages(source: torch.Tensor) -> None:
    """Drops this process's pages of a tensor read from the mapped checkpoint once it has been copied.

    safetensors maps the file, and a dense base's decoder weights are that mapping (in the compute dtype no
    copy is made), so it lives as long as the model; the pages of every tensor copied out of it (embeddings,
    lm_head: 125 MiB of bench/train.py's model) would stay in the RSS beside their copies. madvise(DONTNEED)
    on a file mapping only unmaps them: a later read would fault them in again from the file. Only pages
    wholly inside the tensor, and only in a mapping of a file (never anonymous memory, which it would zero)."""
    start, size = source.data_ptr(), source.numel() * source.element_size()
    if sys.platform != "linux" or source.device.type != "cpu" or size < RELEASE_MIN_BYTES or not source.is_contiguous():
        return
    end, page = start + size, mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first and _in_file_mapping(start, end):
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def _in_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one mapping of a regular file (/proc/self/maps: inode and a path)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= start and end <= high:
                return fields[4] != "0" and len(fields) == 6 and fields[5].startswith("/")
    return False


def load_parts(path_or_id, quantize: str | None, dtype: torch.dtype, device):
    """(config, tokenizer, model) for a base name: "tiny", a checkpoint dir or a cached hub id. The tokenizer is
    None when the dir has no tokenizer.json: the base then takes token ids, and text is refused (base.py)."""
    if str(path_or_id) == "tiny":
        weights = tiny.tiny_weights()
        model = build_model(tiny.TINY_CONFIG, weights.__getitem__, weights, quantize=quantize, dtype=dtype,
                            device=device)
        return tiny.TINY_CONFIG, tiny.byte_tokenizer(), model
    path = checkpoint.resolve_dir(path_or_id)
    config = checkpoint.read_config(path)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    tensors = checkpoint.TensorFile(path)
    model = build_model(config, tensors.get, tensors.names(), quantize=quantize, dtype=dtype, device=device)
    return config, tokenizer, model


def load_identity(path_or_id) -> BaseIdentity:
    """The identity of a base as the registry records it (base_identity.py), computed from the checkpoint's
    config.json and the digest's few tensors, read again here (rows only), not from the loaded weights, whose
    dtype is the compute dtype's."""
    name = str(path_or_id)
    if name == "tiny":
        weights = tiny.tiny_weights()
        return identity_of(tiny.TINY_CONFIG.to_hf_json(), lambda tensor, rows: _rows(weights.get(tensor), rows), name)
    path = checkpoint.resolve_dir(path_or_id)
    tensors = checkpoint.TensorFile(path)
    return identity_of(json.loads((path / "config.json").read_text()),
                       lambda tensor, rows: _rows(tensors.slice(tensor, rows), None), name)


def load_sampling_defaults(path_or_id) -> SamplingDefaults:
    """What the checkpoint's generation_config.json asks of sampling (none for the tiny model)."""
    if str(path_or_id) == "tiny":
        return SamplingDefaults()
    return SamplingDefaults.from_dir(checkpoint.resolve_dir(path_or_id))


def _rows(t: torch.Tensor | None, rows: int | None):
    """float32 numpy values of `t` (its first `rows` rows), or None when the checkpoint lacks the tensor."""
    if t is None:
        return None
    return (t if rows is None else t[:rows]).float().numpy()


def quantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict transformers + bnb save for a 4-bit model: §3.1 keys for decoder linears, the rest dense."""
    linears = model.linears()
    out = {}
    for name, linear in linears.items():
        out.update(linear.weight.state_dict(name + "."))
        if linear.bias is not None:
            out[name + ".bias"] = linear.bias.detach()
    is_tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linears and not (name == "lm_head.weight" and is_tied):
            out[name] = param.detach()
    return out


def save_quantized(path: str | Path, config: ModelConfig, model: Transformer, tokenizer: Tokenizer) -> Path:
    """Writes a 4-bit base as transformers + bitsandbytes would (semantics §3.2)."""
    kinds = {(w.format, getattr(w, "double_quant", False)) for w in (m.weight for m in model.linears().values())}
    if len(kinds) != 1 or next(iter(kinds))[0] not in formats.QUANTIZED:
        raise ConfigError(f"save_quantized needs a base whose linears are all in one 4-bit format, got "
                          f"{sorted(k[0] for k in kinds)}; load it with quantize='nf4' (or another of "
                          f"{list(formats.QUANTIZED)}) first")
    quant_type, double_quant = next(iter(kinds))
    compute = str(model.dtype).removeprefix("torch.")
    qconfig = QuantConfig(quant_type=quant_type, use_double_quant=double_quant, compute_dtype=compute)
    config = ModelConfig(**{**vars(config), "quantization": qconfig})
    return checkpoint.write_checkpoint(path, config, quantized_state(model), tokenizer)
