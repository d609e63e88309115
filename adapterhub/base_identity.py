"""`BaseIdentity`: which base model an adapter was trained on, and the check of an adapter against a base (no torch).

An identity has up to four parts (docs/store-format.md, "Base identity", defines each exactly so that anyone can
recompute them from a Hugging Face checkpoint without torch):

- ``name``: the base's name or path as the user or PEFT (``base_model_name_or_path``) wrote it;
- ``architecture``: ``config.json`` ``architectures[0]``;
- ``config``: sha256 of the canonical JSON of the config fields that define the math (`math_config`);
- ``weights``: sha256 of a few fixed tensors rounded to bf16 (`WEIGHT_ROWS`), cheap to read from any checkpoint.

The registry records an identity per version (from ``push --base DIR``, a training run, or PEFT's name alone);
the runtime computes the identity of the base it loaded. `check_base` compares the two: parts known on both
sides must agree (else `IncompatibleAdapterError`, naming both), and when only names are known a differing
name warns once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adapterhub.errors import ConfigError, IncompatibleAdapterError, ModelLoadError
from adapterhub.safetensors_io import DTYPES, RawTensor

# Tensors of the weight digest, in order: (name, rows read; None = the whole tensor). "{last}" is the index of
# the last decoder layer. Unquantized in every checkpoint format (4-bit checkpoints keep embeddings and norms
# dense, semantics §3.2), so a base and its NF4 copy share a digest; the embedding rows differ between any two
# trainings, the norms move in fine-tuning.
WEIGHT_ROWS = (("model.embed_tokens.weight", 16), ("model.layers.{last}.post_attention_layernorm.weight", None),
               ("model.norm.weight", None))
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class BaseMismatchWarning(UserWarning):
    """An adapter is loaded on a base whose name differs from the one it records (only names are known)."""


@dataclass(frozen=True)
class BaseIdentity:
    """What is known of a base model; every part may be None (unknown)."""

    name: str | None = None
    architecture: str | None = None
    config: str | None = None  # "sha256:<hex>" of canonical_math_config
    weights: str | None = None  # "sha256:<hex>" of the WEIGHT_ROWS in bf16

    @property
    def is_name_only(self) -> bool:
        return self.architecture is None and self.config is None and self.weights is None

    def to_json(self) -> dict[str, str]:
        """The known parts under their store names (docs/store-format.md); unknown parts are left out."""
        parts = {"name_or_path": self.name, "architecture": self.architecture, "config_sha256": self.config,
                 "weights_sha256": self.weights}
        return {key: value for key, value in parts.items() if value is not None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> BaseIdentity | None:
        if not isinstance(d, Mapping):
            return None
        get = {key: d.get(key) if isinstance(d.get(key), str) else None
               for key in ("name_or_path", "architecture", "config_sha256", "weights_sha256")}
        identity = cls(get["name_or_path"], get["architecture"], get["config_sha256"], get["weights_sha256"])
        return None if identity == cls() else identity

    def describe(self) -> str:
        """One line: "name (architecture, config sha256:1234abcd…, weights sha256:…)"."""
        parts = [self.architecture] if self.architecture else []
        parts += [f"{what} {value[:15]}…" for what, value in (("config", self.config), ("weights", self.weights))
                  if value]
        return f"{self.name or 'an unnamed base'}" + (f" ({', '.join(parts)})" if parts else "")

    def differences(self, other: BaseIdentity) -> list[str]:
        """The parts both identities know and that differ: "architecture", "config", "weights"."""
        return [part for part in ("architecture", "config", "weights")
                if getattr(self, part) and getattr(other, part) and getattr(self, part) != getattr(other, part)]

    def with_name(self, name: str | None) -> BaseIdentity:
        return BaseIdentity(name, self.architecture, self.config, self.weights)


# --- computing an identity ----------------------------------------------------------------------------------


def math_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json fields that define a Llama-family forward, with their defaults filled in, so a config
    written by another transformers version (``rope_parameters`` vs ``rope_theta``) or re-saved by adapterhub
    hashes the same. docs/store-format.md lists the fields and rules."""
    try:
        H, D = int(d["num_attention_heads"]), int(d["hidden_size"])
        sizes = {key: int(d[key]) for key in ("vocab_size", "intermediate_size", "num_hidden_layers")}
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"config.json lacks or mangles {error}; the base identity needs a Llama-family "
                          "config (hidden_size, num_attention_heads, ...)") from None
    model_type = d.get("model_type") or _model_type(d)
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None if kind == "default" else {"rope_type": kind, **{
        key: (value if key == "original_max_position_embeddings" or not isinstance(value, (int, float))
              or isinstance(value, bool) else float(value)) for key, value in rope.items()}}
    return {
        "model_type": model_type, "hidden_size": D, "num_attention_heads": H, **sizes,
        "num_key_value_heads": int(d.get("num_key_value_heads") or H), "head_dim": int(d.get("head_dim") or D // H),
        "hidden_act": d.get("hidden_act", "silu"), "rms_norm_eps": float(d.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta, "rope_scaling": scaling,
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
        "attention_bias": model_type == "qwen2" or bool(d.get("attention_bias", False)),
        "mlp_bias": bool(d.get("mlp_bias", False)), "sliding_window": _window(d, model_type),
    }


def _model_type(d: Mapping[str, Any]) -> str | None:
    names = d.get("architectures") or [None]
    return {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}.get(names[0])


def _window(d: Mapping[str, Any], model_type: str | None) -> int | None:
    """The attention window if some layer has one: Mistral's sliding_window; Qwen2's only with
    use_sliding_window; Llama never."""
    if model_type == "llama" or (model_type == "qwen2" and not d.get("use_sliding_window")):
        return None
    window = d.get("sliding_window")
    return None if window is None else int(window)


def config_digest(d: Mapping[str, Any]) -> str:
    text = json.dumps(math_config(d), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def weight_rows(d: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """(tensor name, rows or None) of the weight digest for this config."""
    last = int(d["num_hidden_layers"]) - 1
    return [(name.format(last=last), rows) for name, rows in WEIGHT_ROWS]


def weights_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of the arrays' values rounded to bf16 (round to nearest even), little-endian, one after the other."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(RawTensor.from_array(np.asarray(array, dtype=np.float32), "BF16").data)
    return "sha256:" + digest.hexdigest()


def identity_of(config_json: Mapping[str, Any], read_rows: Callable[[str, int | None], np.ndarray | None],
                name: str | None) -> BaseIdentity:
    """The identity of a checkpoint: its config.json dict and `read_rows(tensor, rows)` -> float32 values, or
    None when the checkpoint has no such tensor (the weight digest is then unknown)."""
    arrays = [read_rows(tensor, rows) for tensor, rows in weight_rows(config_json)]
    weights = None if any(a is None for a in arrays) else weights_digest(arrays)
    names = config_json.get("architectures") or [None]
    return BaseIdentity(name, names[0] if isinstance(names[0], str) else None, config_digest(config_json), weights)


def identity_from_checkpoint(path: str | os.PathLike, name: str | None = None) -> BaseIdentity:
    """The identity of a Hugging Face checkpoint dir (config.json + model.safetensors or its shards), read with
    the numpy safetensors codec: only the headers and the bytes of the digest's rows are read."""
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; --base takes a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error})") from None
    files = _tensor_files(path)
    return identity_of(config, lambda tensor, rows: _read_rows(files.get(tensor), tensor, rows),
                       name if name is not None else str(path))


def _tensor_files(path: Path) -> dict[str, Path]:
    if (path / _INDEX).is_file():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        return {tensor: path / file for tensor, file in weight_map.items()}
    if (path / _SINGLE).is_file():
        return {tensor: path / _SINGLE for tensor in _header(path / _SINGLE)[0]}
    raise ModelLoadError(f"{path} has no {_SINGLE} or {_INDEX}; --base takes a Hugging Face checkpoint directory "
                         "with safetensors weights")


def _header(file: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data section) of a safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 * 1024 * 1024:
            raise ModelLoadError(f"{file}: safetensors header length {n} is implausible; the file is corrupt")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_rows(file: Path | None, tensor: str, rows: int | None) -> np.ndarray | None:
    if file is None:
        return None
    header, start = _header(file)
    entry = header.get(tensor)
    if entry is None or entry["dtype"] not in DTYPES:
        return None
    shape = list(entry["shape"])
    if rows is not None and shape:
        shape[0] = min(rows, shape[0])
    begin = entry["data_offsets"][0]
    size = int(np.prod(shape)) * DTYPES[entry["dtype"]][1]
    with open(file, "rb") as f:
        f.seek(start + begin)
        data = f.read(size)
    if len(data) != size:
        raise ModelLoadError(f"{file}: tensor {tensor!r} is truncated; the checkpoint is corrupt")
    return RawTensor(entry["dtype"], tuple(shape), data).to_float32()


# --- the check ----------------------------------------------------------------------------------------------


def check_base(recorded: BaseIdentity | None, base: BaseIdentity | None, adapter_name: str, *,
               allow_mismatch: bool = False, warned: set | None = None) -> None:
    """Refuse an adapter whose recorded base differs from `base` in a part both know (architecture, config or
    weights); with `allow_mismatch` that only warns. When only names are known, differing names warn, once per
    pair of names (`warned` remembers them). Matching hashes under different names are the same base."""
    if recorded is None or base is None:
        return
    differing = recorded.differences(base)
    if differing:
        message = (f"adapter {adapter_name!r} was trained on base {recorded.describe()}, but this base is "
                   f"{base.describe()}: the {' and '.join(differing)} differ")
        if not allow_mismatch:
            raise IncompatibleAdapterError(f"{message}; load it on its own base, or pass allow_base_mismatch=True "
                                           "(CLI: --allow-base-mismatch) to load it anyway")
        _warn_once((recorded, base), f"{message}; loaded anyway (allow_base_mismatch)", warned)
        return
    if (recorded.is_name_only or base.is_name_only) and not _same_name(recorded.name, base.name):
        _warn_once((recorded.name, base.name), f"adapter {adapter_name!r} names its base {recorded.name!r} but this "
                   f"base is {base.name!r}; only the names are known, so it is loaded; push it with --base DIR to "
                   "record the base's identity and have it checked", warned)


def _same_name(a: str | None, b: str | None) -> bool:
    """Names compare by their last path component ("meta-llama/Llama-3.2-1B" is "/models/Llama-3.2-1B/")."""
    if not a or not b:
        return True
    return a.rstrip("/").rsplit("/", 1)[-1] == b.rstrip("/").rsplit("/", 1)[-1]


def _warn_once(key: tuple, message: str, warned: set | None) -> None:
    """One warning per pair of bases (`key`), whichever adapter, and whoever checks it (the server checks an
    adapter when it is read and again when the pool installs it)."""
    if warned is not None:
        if key in warned:
            return
        warned.add(key)
    warnings.warn(message, BaseMismatchWarning, stacklevel=3)
