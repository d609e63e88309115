"""Base model weights in: a Hugging Face dir, a hub id from the local HF cache, or the embedded tiny model.

The model is built on the meta device; each decoder linear is then swapped for a real `AdapterLinear`
holding the loaded (or NF4-quantized) weight, and the rest (embeddings, norms, lm_head) get storage
once and are filled from the file: every tensor is read once and never held twice (the gpt-fast
"build, then swap in" order). A transformers + bitsandbytes 4-bit checkpoint (SEMANTICS §3.1/§3.2)
loads as saved; `save_quantized` writes that same format, so the next load skips quantizing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub.errors import ModelLoadError
from adapterhub.runtime.config import ModelConfig, QuantConfig
from adapterhub.runtime.linear import AdapterLinear
from adapterhub.runtime.model import Transformer
from adapterhub.runtime.tokenizer import Tokenizer

INDEX = "model.safetensors.index.json"
QUANTIZE = (None, "nf4")
# Per-module keys of a bnb 4-bit weight (SEMANTICS §3.1), relative to `<module>.`; the JSON blob key varies.
_NF4_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_NF4_BLOB = "weight.quant_state.bitsandbytes__nf4"


class TensorFile:
    """Name -> tensor over one `model.safetensors` or the shards of an index; one read per tensor."""

    def __init__(self, path: Path):
        if (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = {name: path / file for name, file in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            files = None
        else:
            _refuse_missing(path)
        self._handles = {}
        if files is None:
            handle = safe_open(path / "model.safetensors", framework="pt")
            files = {name: path / "model.safetensors" for name in handle.keys()}
            self._handles[path / "model.safetensors"] = handle
        self.files = files

    def names(self):
        return self.files.keys()

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._handles:
            if not file.is_file():
                raise ModelLoadError(f"shard {file.name} named in {INDEX} is missing from {file.parent}")
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(name)


def _refuse_missing(path: Path):
    if (path / "pytorch_model.bin").exists() or (path / "pytorch_model.bin.index.json").exists():
        raise ModelLoadError(
            f"{path} holds pickle weights (pytorch_model.bin), which can run arbitrary code when loaded and are "
            "never read. Convert them once: transformers' AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelLoadError(f"{path} has no model.safetensors or {INDEX}; expected a Hugging Face checkpoint dir")


def resolve_dir(path_or_id: str | Path) -> Path:
    """A local dir as is; otherwise a hub id looked up in the local HF cache (never downloaded)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).count("/") != 1:
        raise ModelLoadError(f"base {str(path_or_id)!r} is neither a checkpoint dir nor a hub id 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as error:
        raise ModelLoadError(
            f"hub id {str(path_or_id)!r} is not in the local Hugging Face cache and adapterhub never downloads "
            f"at run time ({type(error).__name__}). Fetch it first: huggingface-cli download {path_or_id}"
        ) from None


def read_config(path: Path) -> ModelConfig:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face checkpoint dir")
    config = ModelConfig.from_hf_json(json.loads((path / "config.json").read_text()))
    # Chat models list their end-of-turn ids in generation_config.json (Llama 3: <|eot_id|> next to eos).
    generation = path / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    extra = [eos] if isinstance(eos, int) else list(eos or [])
    return replace(config, eos_token_id=tuple(dict.fromkeys([*config.eos_token_id, *extra])))


def build_model(config: ModelConfig, get: Callable[[str], torch.Tensor], names, *, quantize: str | None,
                dtype: torch.dtype, device) -> Transformer:
    """A Transformer whose weights come from `get(name)`; `names` are the names the source holds."""
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"quantize={quantize!r} is not supported; use one of {QUANTIZE}")
    names = set(names)
    model = Transformer(config, dtype=dtype, device="meta")
    for name, meta in model.linears().items():
        linear = AdapterLinear(meta.in_features, meta.out_features, meta.bias is not None, dtype=dtype, device=device)
        if name + "." + _NF4_BLOB in names:  # bnb 4-bit checkpoint: adopt the stored NF4 state
            _load_prequantized(linear, name, get, names)
        elif name + ".weight.quant_state.bitsandbytes__fp4" in names:
            raise ModelLoadError(f"{name} is stored as bitsandbytes FP4; only NF4 4-bit checkpoints load as saved")
        else:
            w = _checked(get, names, name + ".weight", (meta.out_features, meta.in_features))
            linear.load_nf4(w.to(dtype)) if quantize == "nf4" else linear.load_dense(w)
        if linear.bias is not None:
            linear.bias.data.copy_(_checked(get, names, name + ".bias", (meta.out_features,)))
        model.set_submodule(name, linear)
    model.materialize(device)
    linears = set(model.linears())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[0] in linears or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            param.copy_(_checked(get, names, name, tuple(param.shape)))
    return model.eval()


def _load_prequantized(linear: AdapterLinear, name: str, get, names: set) -> None:
    try:
        linear.load_nf4({s: get(f"{name}.{s}") for s in (*_NF4_SUFFIXES, _NF4_BLOB) if f"{name}.{s}" in names})
    except (ValueError, KeyError) as error:  # QuantizationError is a ValueError
        raise ModelLoadError(f"the bitsandbytes 4-bit weight of {name} does not load: {error}") from error


def _checked(get, names: set, name: str, shape: tuple) -> torch.Tensor:
    if name not in names:
        raise ModelLoadError(f"checkpoint lacks tensor {name!r} (expected shape {list(shape)}); "
                             "is the config.json from the same model?")
    t = get(name)
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"tensor {name!r} has shape {list(t.shape)} but config.json implies {list(shape)}")
    return t


def load_parts(path_or_id, quantize: str | None, dtype: torch.dtype, device):
    """(config, tokenizer, model) for a base name: "tiny", a checkpoint dir or a cached hub id."""
    if str(path_or_id) == "tiny":
        from adapterhub.runtime.tiny import TINY_CONFIG, byte_tokenizer, tiny_weights

        weights = tiny_weights()
        model = build_model(TINY_CONFIG, weights.__getitem__, weights, quantize=quantize, dtype=dtype, device=device)
        return TINY_CONFIG, byte_tokenizer(), model
    path = resolve_dir(path_or_id)
    config = read_config(path)
    tokenizer = Tokenizer.from_dir(path)
    tensors = TensorFile(path)
    model = build_model(config, tensors.get, tensors.names(), quantize=quantize, dtype=dtype, device=device)
    return config, tokenizer, model


def write_checkpoint(path: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer,
                     *, max_shard_bytes: int | None = None) -> Path:
    """config.json + model.safetensors (or shards + index, past `max_shard_bytes`) + tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32  # the weights' dtype, for transformers
    (path / "config.json").write_text(json.dumps(config.to_hf_json(dtype), indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tokenizer.save(path)
    return path


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def quantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict transformers + bnb save for a 4-bit model: §3.1 keys for decoder linears, the rest dense."""
    linears = model.linears()
    out = {}
    for name, linear in linears.items():
        out.update(linear.nf4_state_dict(name + "."))
        if linear.bias is not None:
            out[name + ".bias"] = linear.bias.detach()
    is_tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linears and not (name == "lm_head.weight" and is_tied):
            out[name] = param.detach()
    return out


def save_quantized(path: str | Path, config: ModelConfig, model: Transformer, tokenizer: Tokenizer) -> Path:
    """Writes the NF4 base as transformers + bitsandbytes would (SEMANTICS §3.2)."""
    compute = str(model.dtype).removeprefix("torch.")
    qconfig = QuantConfig(use_double_quant=True, compute_dtype=compute)
    config = ModelConfig(**{**vars(config), "quantization": qconfig})
    return write_checkpoint(path, config, quantized_state(model), tokenizer)
