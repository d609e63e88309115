"""Hugging Face checkpoint directories: finding one (a dir, or a hub id in the local HF cache), reading its
config and tensors (one read per tensor, shards through the index), and writing one.

Pickle weights (``pytorch_model.bin``) are never read: they can run code when loaded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub.errors import ModelLoadError
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tokenizer import Tokenizer

INDEX = "model.safetensors.index.json"


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
        return self._handle(name).get_tensor(name)

    def slice(self, name: str, rows: int | None) -> torch.Tensor | None:
        """The first `rows` rows of tensor `name` (all with None), reading only those; None if it is absent."""
        if name not in self.files:
            return None
        view = self._handle(name).get_slice(name)
        return view[:rows] if rows is not None else view[:]

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            if not file.is_file():
                raise ModelLoadError(f"shard {file.name} named in {INDEX} is missing from {file.parent}")
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]


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


def write_checkpoint(path: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer,
                     *, max_shard_bytes: int | None = None) -> Path:
    """config.json + generation_config.json + model.safetensors (or shards + index, past `max_shard_bytes`) +
    tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32  # the weights' dtype, for transformers
    (path / "config.json").write_text(json.dumps(config.to_hf_json(dtype), indent=2) + "\n")
    _write_generation_config(path, config)
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
    if tokenizer is not None:  # a base loaded without tokenizer.json is written without one
        tokenizer.save(path)
    return path


def _write_generation_config(path: Path, config: ModelConfig) -> None:
    """generation_config.json, as transformers writes it beside config.json: the ids generation starts and
    stops on (several eos ids for chat models: end of text and end of turn)."""
    eos = list(config.eos_token_id)
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps({k: v for k, v in ids.items() if v is not None},
                                                            indent=2) + "\n")


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




def checked(get, names, name: str, shape: tuple) -> torch.Tensor:
    """Tensor `name` from a checkpoint, which must exist with this shape."""
    if name not in names:
        raise ModelLoadError(f"checkpoint lacks tensor {name!r} (expected shape {list(shape)}); "
                             "is the config.json from the same model?")
    t = get(name)
    if tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"tensor {name!r} has shape {list(t.shape)} but config.json implies {list(shape)}")
    return t
