"""A PEFT LoRA / rsLoRA / DoRA adapter in memory: config, exact tensors, validation (no torch).

Shared by the registry (which stores the exact on-disk bytes) and the runtime (which wants float32
arrays per module). The interchange format is what PEFT ``save_pretrained`` writes (semantics §6):
``adapter_config.json`` + ``adapter_model.safetensors``. Tensors keep their on-disk dtype and bytes, so
F32, F16 and BF16 round-trip byte-identically (the codec is ``adapterhub.safetensors_io``; its
``RawTensor``, ``read_safetensors`` and ``write_safetensors`` are re-exported here).

Pickle (``adapter_model.bin``) is never loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from adapterhub.base_identity import BaseIdentity, check_base
from adapterhub.errors import AdapterFormatError, ConfigError, IncompatibleAdapterError
from adapterhub.fsio import fsync_dir, write_replace
from adapterhub.module_regex import ModuleRegex, check_layers_pattern, module_regex
from adapterhub.safetensors_io import DTYPE_CODES, RawTensor, read_safetensors, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
CARD_FILE = "README.md"  # the model card PEFT's save_pretrained writes; it travels with the version
MAX_CARD_BYTES = 1024 * 1024  # a card is prose; a bigger README is refused rather than stored in the config blob
KEY_PREFIX = "base_model.model."
# PEFT on-disk key suffixes (semantics §6.3): which AdapterModule field each one fills.
KEY_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}

# `LoraConfig().to_dict()` of peft 0.21.2 (semantics §6.2): what random_adapter writes besides its values.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2",
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None,
    "target_parameters": None, "task_type": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# target_modules=None on a Llama-family model resolves to these (semantics §6.4).
DEFAULT_TARGETS = ("q_proj", "v_proj")
# target_modules="all-linear" (any case) resolves to every nn.Linear but the output layer (§6.4); on the
# supported decoders that is these projections in every layer, never lm_head: the 7 separate ones, or
# Phi-3's 4 with its fused qkv_proj / gate_up_proj (a model has one set or the other, §12.5).
ALL_LINEAR = "all-linear"
ALL_LINEAR_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj")


# --- config -------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _names(value: Any, field_name: str) -> str | tuple[str, ...] | None:
    """A PEFT module selector: None, a regex string, or a list of names (kept as a tuple)."""
    if value is None:
        return None
    if isinstance(value, str):
        if field_name == "layers_pattern":
            return check_layers_pattern(value)
        module_regex(value, field_name)  # ConfigError now for a bad regex, not at the first match
        return value
    _check(isinstance(value, list) and all(isinstance(v, str) and v for v in value),
           f"{field_name} must be null, a regex string or a list of module names; got {value!r}")
    return tuple(value)


def _pattern(value: Any, field_name: str, check_value) -> dict[str, Any]:
    _check(isinstance(value, dict), f"{field_name} must be an object {{pattern: value}}; got {value!r}")
    for key, item in value.items():
        _check(check_value(item), f"{field_name}[{key!r}] = {item!r} is invalid; expected a positive number")
        _key_regex(key)
    return dict(value)


def _pattern_lookup(pattern: Mapping[str, Any], module: str, default):
    """First key K (dict order) whose `(.*\\.)?(K)$` fully matches the module name wins (semantics §4.2)."""
    for key, value in pattern.items():
        if _key_regex(key).fullmatch(module):
            return value
    return default


def _key_regex(key: str) -> ModuleRegex:
    """A rank_pattern / alpha_pattern key matches a module name or its dotted suffix (PEFT's rule)."""
    return module_regex(rf"(.*\.)?({key})$", f"rank_pattern / alpha_pattern key {key!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of `adapter_config.json` adapterhub uses; `to_dict()` returns the original dict."""

    peft_type: str
    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...] | None
    use_dora: bool = False
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        _check(isinstance(d, Mapping), f"adapter config must be a JSON object; got {type(d).__name__}")
        for required in ("peft_type", "r", "lora_alpha"):
            _check(required in d, f"adapter config is missing the required field {required!r}; "
                                  "PEFT writes it in adapter_config.json")
        peft_type = d["peft_type"]
        _check(peft_type == "LORA", f"peft_type {peft_type!r} is not supported; adapterhub supports only "
                                    "'LORA' adapters (LoRA, rsLoRA, DoRA)")
        _check(_is_int(d["r"]) and d["r"] > 0, f"r must be a positive integer; got {d['r']!r}")
        _check(_is_number(d["lora_alpha"]), f"lora_alpha must be a finite number; got {d['lora_alpha']!r}")
        flags = {k: d.get(k, False) for k in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias")}
        for key, value in flags.items():
            _check(isinstance(value, bool), f"{key} must be true or false; got {value!r}")
        _check(not (flags["use_dora"] and flags["lora_bias"]),
               "lora_bias=true is not allowed with use_dora=true (PEFT refuses it too); set one of them to false")
        _check(not flags["lora_bias"], "lora_bias=true (a bias on lora_B) is not supported by adapterhub; "
                                       "retrain with lora_bias=false")
        bias = d.get("bias", "none")
        _check(bias == "none", f"bias={bias!r} saves base-layer biases, which adapterhub does not support; "
                               "use bias='none'")
        modules_to_save = d.get("modules_to_save")
        _check(not modules_to_save, f"modules_to_save={modules_to_save!r} (fully trained extra modules) is not "
                                    "supported; adapterhub keeps LoRA tensors only")
        targets = _names(d.get("target_modules"), "target_modules")
        layers = d.get("layers_to_transform")
        if _is_int(layers):
            layers = [layers]
        _check(layers is None or (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers)),
               f"layers_to_transform must be null, an int or a list of ints; got {layers!r}")
        _check(layers is None or not isinstance(targets, str),
               "layers_to_transform cannot be used when target_modules is a string (PEFT rule, §6.4)")
        layers_pattern = _names(d.get("layers_pattern"), "layers_pattern")
        _check(layers_pattern is None or not isinstance(targets, str),
               "layers_pattern cannot be used when target_modules is a string (PEFT rule, §6.4)")
        _check(not layers_pattern or layers is not None,
               f"layers_pattern={layers_pattern!r} needs layers_to_transform (PEFT rule); set both or neither")
        for key in ("base_model_name_or_path", "task_type"):
            _check(d.get(key) is None or isinstance(d.get(key), str), f"{key} must be a string or null")
        return cls(
            peft_type=peft_type, r=d["r"], lora_alpha=d["lora_alpha"], target_modules=targets,
            use_dora=flags["use_dora"], use_rslora=flags["use_rslora"],
            rank_pattern=_pattern(d.get("rank_pattern") or {}, "rank_pattern", lambda v: _is_int(v) and v > 0),
            alpha_pattern=_pattern(d.get("alpha_pattern") or {}, "alpha_pattern", _is_number),
            fan_in_fan_out=flags["fan_in_fan_out"], bias=bias, lora_bias=flags["lora_bias"],
            modules_to_save=None, layers_to_transform=None if layers is None else tuple(layers),
            layers_pattern=layers_pattern,
            exclude_modules=_names(d.get("exclude_modules"), "exclude_modules"),
            base_model_name_or_path=d.get("base_model_name_or_path"), task_type=d.get("task_type"),
            raw=json.loads(json.dumps(d)),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> AdapterConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdapterFormatError(f"{path} does not exist; a PEFT adapter directory needs {CONFIG_FILE}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AdapterFormatError(f"{path} is not valid JSON ({error}); re-save the adapter with "
                                     "peft save_pretrained") from None
        try:
            return cls.from_dict(d)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The dict this config was read from, unknown fields included (a deep copy)."""
        return json.loads(json.dumps(self.raw))

    def rank(self, module: str) -> int:
        return _pattern_lookup(self.rank_pattern, module, self.r)

    def alpha(self, module: str) -> float:
        return _pattern_lookup(self.alpha_pattern, module, self.lora_alpha)

    def scaling(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, with the per-module r and alpha (semantics §4.2)."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def matches(self, module: str) -> bool:
        """Whether PEFT would put a LoRA layer on `module` (a full HF module path; semantics §6.4).

        Follows peft 0.21.2 `check_target_module_exists`: exclude_modules wins; a string is a full-match
        regex; a list entry matches the whole name (then layers_to_transform is not consulted) or a
        "." + entry suffix (then it is). None and "all-linear" resolve as on a Llama-family decoder.
        """
        if _selects(self.exclude_modules, module):
            return False
        targets = self.target_modules
        if targets is None:
            targets = DEFAULT_TARGETS
        elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            targets = ALL_LINEAR_TARGETS
        if isinstance(targets, str):
            return module_regex(targets, "target_modules").fullmatch(module)
        if module in targets:
            return True
        if not _selects(targets, module):
            return False
        # An empty layers_to_transform restricts nothing, as in PEFT.
        return not self.layers_to_transform or _layer_index(module, self.layers_pattern) in self.layers_to_transform


def _selects(selector: str | tuple[str, ...] | None, module: str) -> bool:
    if selector is None:
        return False
    if isinstance(selector, str):
        return module_regex(selector, "exclude_modules").fullmatch(module)
    return any(module == name or module.endswith("." + name) for name in selector)


def _layer_index(module: str, layers_pattern: str | tuple[str, ...] | None) -> int | None:
    """The FIRST "<container>.<digits>." index (lazy `.*?`), so "layers.1.experts.0.w1" is layer 1, not 0.

    With layers_pattern the container must be one of the patterns (regexes), at the start of the name
    or after a dot; an empty or missing layers_pattern accepts any container (peft 0.21.2).
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", module)
        return int(found.group(1)) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        # grouped, so "layers|h" is one alternative of the container (unbracketed, the '|' would split the
        # whole regex and leave the index group empty; peft 0.21.2 crashes on that with a TypeError)
        found = re.match(rf"(?:^|.*?\.)(?:{pattern})\.(\d+)\.", module)
        if found:
            return int(found.group(1))
    return None


# --- the adapter --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterModule:
    """One adapted linear: name is the HF module path, e.g. "model.layers.0.self_attn.q_proj"."""

    name: str
    lora_A: np.ndarray  # (R, Din) float32
    lora_B: np.ndarray  # (Dout, R) float32
    magnitude: np.ndarray | None  # (Dout,) float32, DoRA only
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]


def _split_key(key: str) -> tuple[str, str] | None:
    """PEFT key -> (module path, AdapterModule field), or None when it is not a LoRA tensor key."""
    if not key.startswith(KEY_PREFIX):
        return None
    for suffix, part in KEY_SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
            return key[len(KEY_PREFIX):-len(suffix)], part
    return None


def peft_key(module: str, part: str) -> str:
    """(module path, "lora_A" | "lora_B" | "magnitude") -> the PEFT on-disk key (semantics §6.3)."""
    suffix = {v: k for k, v in KEY_SUFFIXES.items()}[part]
    return KEY_PREFIX + module + suffix


class Adapter:
    """A validated PEFT adapter: `config` plus `tensors` keyed by PEFT key, exact dtype and bytes.

    `base`: the identity of the base it was trained on (base_identity.py); without one, the name PEFT recorded
    (`base_model_name_or_path`) when there is one. `model_card`: the README.md PEFT writes beside the adapter.
    """

    def __init__(self, config: AdapterConfig | Mapping[str, Any],
                 tensors: Mapping[str, RawTensor | np.ndarray], *, base: BaseIdentity | None = None,
                 model_card: str | None = None):
        self.config = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
        self.tensors: dict[str, RawTensor] = {
            key: t if isinstance(t, RawTensor) else RawTensor.from_array(t) for key, t in sorted(tensors.items())}
        self._parts = _validate(self.config, self.tensors)
        self._modules: dict[str, AdapterModule] | None = None
        named = self.config.base_model_name_or_path
        self.base = base if base is not None else (BaseIdentity(name=named) if named else None)
        if model_card is not None and len(model_card.encode()) > MAX_CARD_BYTES:
            raise AdapterFormatError(f"the model card ({CARD_FILE}) is {len(model_card.encode())} bytes, over the "
                                     f"{MAX_CARD_BYTES}-byte limit; shorten it or link to a longer document")
        self.model_card = model_card

    @classmethod
    def from_peft_dir(cls, path: str | os.PathLike) -> Adapter:
        path = Path(path)
        if not path.is_dir():
            raise AdapterFormatError(f"{path} is not a directory; expected a PEFT adapter directory with "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            if (path / PICKLE_FILE).exists():
                raise AdapterFormatError(
                    f"{path} holds {PICKLE_FILE} (a pickle, which adapterhub never loads) and no {WEIGHTS_FILE}; "
                    "convert it: `safetensors.torch.save_file(torch.load(p, weights_only=True), "
                    f"'{WEIGHTS_FILE}', metadata={{'format': 'pt'}})`, or re-save with peft "
                    "`model.save_pretrained(dir, safe_serialization=True)`")
            raise AdapterFormatError(f"{path} has no {WEIGHTS_FILE}; a PEFT adapter directory needs it")
        config = AdapterConfig.from_json_file(path / CONFIG_FILE)
        tensors, _ = read_safetensors(weights.read_bytes(), str(weights))
        card = path / CARD_FILE
        try:
            text = card.read_text(encoding="utf-8") if card.is_file() else None
        except UnicodeDecodeError as error:
            raise AdapterFormatError(f"{card} is not UTF-8 text ({error}); save the model card as UTF-8") from None
        try:
            return cls(config, tensors, model_card=text)
        except AdapterFormatError as error:
            raise AdapterFormatError(f"{path}: {error}") from None

    def safetensors_bytes(self) -> bytes:
        return write_safetensors(self.tensors, {"format": "pt"})

    def config_json(self) -> str:
        """adapter_config.json as PEFT writes it: json indent=2, sort_keys."""
        return json.dumps(self.config.to_dict(), indent=2, sort_keys=True)

    def peft_files(self) -> dict[str, bytes]:
        """{file name: bytes} of the PEFT directory: config, weights and the model card when there is one."""
        files = {CONFIG_FILE: self.config_json().encode(), WEIGHTS_FILE: self.safetensors_bytes()}
        if self.model_card is not None:
            files[CARD_FILE] = self.model_card.encode()
        return files

    def save_peft_dir(self, path: str | os.PathLike) -> Path:
        """Write the PEFT files atomically: a new dir appears whole; an existing one gets each file renamed in."""
        path = Path(path)
        files = self.peft_files()
        if path.is_dir():
            for name, data in files.items():
                write_replace(path / name, data)
            fsync_dir(path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name, data in files.items():
                write_replace(tmp / name, data)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        return path

    def modules(self) -> dict[str, AdapterModule]:
        """{HF module path: AdapterModule} with float32 arrays (cached)."""
        if self._modules is None:
            self._modules = {
                module: AdapterModule(
                    module, parts["lora_A"], parts["lora_B"], parts.get("magnitude"), self.config.scaling(module))
                for module, parts in self._parts.items()}
        return self._modules

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module: (Dout, Din)} of every adapted linear."""
        return {m: (p["lora_B"].shape[0], p["lora_A"].shape[1]) for m, p in self._parts.items()}

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in self.tensors.values())

    def __repr__(self) -> str:
        kind = "DoRA" if self.config.use_dora else "LoRA"
        return f"Adapter({kind}, r={self.config.r}, modules={len(self._parts)}, nbytes={self.nbytes})"



# --- an adapter against a base, and where an adapter comes from ---------------------------------


def check_fits(adapter: Adapter, module_shapes: Mapping[str, tuple[int, int]], name: str,
               base: BaseIdentity | None = None, *, allow_base_mismatch: bool = False,
               warned: set | None = None) -> dict[str, AdapterModule]:
    """The one check of an adapter against a base (the runtime's pool and the server both call it): LoRA /
    DoRA tensors only, every adapted module exists in the base with the same (Dout, Din), and the base is
    the one the adapter records (base_identity.check_base: `base` is the loaded base's identity; a mismatch
    raises unless `allow_base_mismatch`, a name-only mismatch warns once per `warned`).
    module_shapes: the base's {HF module path: (Dout, Din)}. Returns adapter.modules(); raises
    IncompatibleAdapterError naming the adapter, the module and both shapes (or both identities)."""
    check_base(adapter.base, base, name, allow_mismatch=allow_base_mismatch, warned=warned)
    config = adapter.config
    if config.modules_to_save or config.lora_bias or config.bias != "none":
        raise IncompatibleAdapterError(
            f"adapter {name!r} uses modules_to_save={config.modules_to_save!r} / lora_bias={config.lora_bias} / "
            f"bias={config.bias!r}; adapterhub batches LoRA / DoRA tensors only; retrain without them")
    for module, shape in adapter.module_shapes().items():
        if module not in module_shapes:
            known = sorted(module_shapes)
            raise IncompatibleAdapterError(
                f"adapter {name!r} targets module {module!r}, which the base model does not have (it has "
                f"{len(known)} adaptable modules, e.g. {known[:3]}); was the adapter trained on another base?")
        if tuple(shape) != tuple(module_shapes[module]):
            raise IncompatibleAdapterError(
                f"adapter {name!r} module {module!r} has (out, in) = {tuple(shape)} but the base layer is "
                f"{tuple(module_shapes[module])}; the adapter was trained on a base of another size")
    return adapter.modules()


def adapter_source(source: Adapter | str | os.PathLike) -> Adapter | Path | str:
    """Which kind of adapter source a user named: an `Adapter` as is, a PEFT directory as a `Path`, or a
    registry ref as a `str`. One rule for the API and the CLI: a `str` is a ref unless it is clearly a path
    (starts with "./", "../", "/" or "~", or holds a path separator, which no ref can); a `PathLike` is a
    path. A bare name that is also an entry in the working directory is ambiguous: an error names both."""
    if isinstance(source, Adapter):
        return source
    if isinstance(source, os.PathLike):
        return Path(source).expanduser()
    if not isinstance(source, str) or not source:
        raise ConfigError(f"an adapter source is an Adapter, a PEFT directory or a registry ref, got {source!r}")
    if source.startswith(("./", "../", "/", "~")) or source in (".", "..") or os.sep in source or "/" in source:
        return Path(source).expanduser()
    if os.path.lexists(source):  # an explicit ref ("task:tag", "task@v3") is ambiguous only if that name exists
        raise ConfigError(
            f"adapter {source!r} is ambiguous: it is read as a registry ref, but ./{source} also exists here; "
            f"write './{source}' for the directory or '{source}:latest' (or another tag / @vN) for the registry task")
    return source


def _validate(config: AdapterConfig, tensors: Mapping[str, RawTensor]) -> dict[str, dict[str, np.ndarray]]:
    """Group tensors per module and check them against the config; returns float32 arrays per part."""
    if not tensors:
        raise AdapterFormatError("the adapter has no tensors; expected lora_A / lora_B weights per target module")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            raise AdapterFormatError(f"unexpected tensor {key!r}: adapter keys look like '{KEY_PREFIX}<module>"
                                     ".lora_A.weight' / '.lora_B.weight' / '.lora_magnitude_vector'")
        module, part = split
        if not config.matches(module):
            raise AdapterFormatError(f"tensor {key!r} is for module {module!r}, which the config's target_modules="
                                     f"{config.target_modules!r} does not select; fix target_modules or drop it")
        if part == "magnitude" and not config.use_dora:
            raise AdapterFormatError(f"tensor {key!r} is a DoRA magnitude but the config has use_dora=false")
        values = tensor.to_float32()
        if not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise AdapterFormatError(f"tensor {key!r} has {bad} NaN/Inf values of {values.size}; "
                                     "the adapter is corrupt or diverged in training")
        parts.setdefault(module, {})[part] = values
    for module, found in parts.items():
        _check_module(config, module, found)
    return parts


def _check_module(config: AdapterConfig, module: str, found: dict[str, np.ndarray]) -> None:
    needed = ("lora_A", "lora_B", "magnitude") if config.use_dora else ("lora_A", "lora_B")
    for part in needed:
        if part not in found:
            raise AdapterFormatError(f"module {module!r} has no {peft_key(module, part)!r} tensor"
                                     + (" (use_dora=true needs a magnitude per module)" if part == "magnitude" else ""))
    a, b, r = found["lora_A"], found["lora_B"], config.rank(module)
    if a.ndim != 2 or a.shape[0] != r:
        raise AdapterFormatError(f"{peft_key(module, 'lora_A')!r} has shape {list(a.shape)}; expected [r, in] "
                                 f"with r={r} from the config")
    if b.ndim != 2 or b.shape[1] != r:
        raise AdapterFormatError(f"{peft_key(module, 'lora_B')!r} has shape {list(b.shape)}; expected [out, r] "
                                 f"with r={r} from the config")
    m = found.get("magnitude")
    if m is not None and m.shape != (b.shape[0],):
        raise AdapterFormatError(f"{peft_key(module, 'magnitude')!r} has shape {list(m.shape)}; expected "
                                 f"[out] = [{b.shape[0]}] to match lora_B")


# --- test / demo adapters -----------------------------------------------------------------------


def random_adapter(module_shapes: Mapping[str, tuple[int, int]], r: int = 8, lora_alpha: float = 16,
                   target_modules=DEFAULT_TARGETS, use_dora: bool = False, use_rslora: bool = False,
                   seed: int = 0, base_weights: Mapping[str, np.ndarray] | None = None,
                   dtype: str = "float32") -> Adapter:
    """A realistic PEFT adapter for the targeted modules of `module_shapes` ({module: (Dout, Din)}).

    Initialised like `init_lora_weights=False` (semantics §4.3): A ~ U(±1/√Din), B ~ U(±1/√R), so the
    adapter is not a no-op. DoRA magnitude = ‖W + s·B·A‖_row (§5.2) from `base_weights` when given, else
    a positive random vector. `dtype` is the on-disk dtype: "float32", "float16" or "bfloat16".
    """
    if dtype not in DTYPE_CODES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16")
    targets = target_modules if isinstance(target_modules, str) else sorted(target_modules)  # a regex or "all-linear"
    config = AdapterConfig.from_dict({**PEFT_DEFAULTS, "r": r, "lora_alpha": lora_alpha,
                                      "target_modules": targets, "use_dora": use_dora,
                                      "use_rslora": use_rslora, "init_lora_weights": False})
    rng = np.random.default_rng(seed)
    code = DTYPE_CODES[dtype]
    tensors: dict[str, RawTensor] = {}
    for module in sorted(module_shapes):
        if not config.matches(module):
            continue
        d_out, d_in = module_shapes[module]
        a = rng.uniform(-1, 1, (r, d_in)).astype(np.float32) / np.float32(math.sqrt(d_in))  # (R, Din)
        b = rng.uniform(-1, 1, (d_out, r)).astype(np.float32) / np.float32(math.sqrt(r))  # (Dout, R)
        tensors[peft_key(module, "lora_A")] = stored_a = RawTensor.from_array(a, code)
        tensors[peft_key(module, "lora_B")] = stored_b = RawTensor.from_array(b, code)
        a, b = stored_a.to_float32(), stored_b.to_float32()  # the magnitude sees the values as stored
        if use_dora:
            if base_weights is not None:
                w = np.asarray(base_weights[module], dtype=np.float32)  # (Dout, Din)
                magnitude = np.linalg.norm(w + np.float32(config.scaling(module)) * (b @ a), axis=1)
            else:
                magnitude = rng.uniform(0.5, 1.5, d_out)
            tensors[peft_key(module, "magnitude")] = RawTensor.from_array(magnitude.astype(np.float32), code)
    if not tensors:
        raise ConfigError(f"target_modules={targets!r} selects none of the {len(module_shapes)} modules "
                          f"given (e.g. {next(iter(module_shapes), None)!r})")
    return Adapter(config, tensors)
