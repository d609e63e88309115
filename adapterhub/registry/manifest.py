"""Manifests and config blobs: canonical JSON in OCI image-manifest shape (docs/store-format.md).

A version is one OCI image manifest: `config` points at the adapter config blob (the PEFT
adapter_config.json and the base fingerprint), `layers` are the raw tensor blobs in key order, each
annotated with its PEFT key, dtype and shape. Task, version and creation time are manifest annotations,
so the same bytes push unchanged to any OCI distribution registry (tags `vN`, `latest`, user tags).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from adapterhub.adapter import Adapter
from adapterhub.base_identity import BaseIdentity
from adapterhub.errors import ConfigError, IntegrityError
from adapterhub.registry.digest import Digest, is_digest
from adapterhub.safetensors_io import DTYPES

FORMAT_VERSION = 1
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.adapterhub.adapter.v1"
CONFIG_MEDIA_TYPE = "application/vnd.adapterhub.adapter.config.v1+json"
TENSOR_MEDIA_TYPE = "application/vnd.adapterhub.tensor.v1.raw"
# annotation keys (OCI: reverse-domain names, string values)
TASK, VERSION, CREATED = "org.adapterhub.task", "org.adapterhub.version", "org.opencontainers.image.created"
T_NAME, T_DTYPE, T_SHAPE = "org.adapterhub.tensor.name", "org.adapterhub.tensor.dtype", "org.adapterhub.tensor.shape"
# shuffle width by safetensors dtype (blobs.py); JSON blobs use 1
WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per value, so equal content has equal digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class TensorDescriptor:
    name: str  # PEFT key
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    digest: Digest
    size: int  # raw bytes

    def to_oci(self) -> dict[str, Any]:
        return {"mediaType": TENSOR_MEDIA_TYPE, "digest": self.digest, "size": self.size,
                "annotations": {T_NAME: self.name, T_DTYPE: self.dtype, T_SHAPE: json.dumps(list(self.shape))}}


@dataclass(frozen=True)
class Manifest:
    task: str
    version: int
    created: str
    config_digest: Digest
    config_size: int
    tensors: tuple[TensorDescriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return canonical_json({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": self.config_digest, "size": self.config_size},
            "layers": [t.to_oci() for t in self.tensors],
            "annotations": {**self.annotations, TASK: self.task, VERSION: str(self.version), CREATED: self.created},
        })

    def at(self, version: int, created: str) -> Manifest:
        return replace(self, version=version, created=created)

    def content_key(self) -> tuple:
        """Everything but version and time: pushing equal content again reuses the latest version."""
        return self.task, self.config_digest, self.tensors, tuple(sorted(self.annotations.items()))

    def blobs(self) -> list[tuple[Digest, int]]:
        return [(self.config_digest, self.config_size)] + [(t.digest, t.size) for t in self.tensors]

    @classmethod
    def from_json(cls, data: bytes, what: str, task: str | None = None) -> Manifest:
        """Parse and check a manifest; IntegrityError names the field that is wrong.

        `task`: the task the manifest is stored under, which its task annotation must name. A manifest
        claiming another task would make ``a@v1`` load (and ``rm``, ``gc`` count) another task's adapter.
        """
        try:
            d = json.loads(data)
        except ValueError as error:  # UnicodeDecodeError is a ValueError
            raise IntegrityError(f"{what}: the manifest is not JSON ({error}); the blob is corrupt, run "
                                 "'adapterhub verify'") from None
        manifest = _manifest(d, what)
        if task is not None and manifest.task != task:
            raise IntegrityError(f"{what}: the manifest belongs to task {manifest.task!r} but is stored under task "
                                 f"{task!r} (was a ref file copied between tasks?); remove this ref and push or "
                                 f"'adapterhub copy' the adapter into {task!r} instead")
        return manifest


_VERSION_TEXT = re.compile(r"[1-9][0-9]*")


def _manifest(d: Any, what: str) -> Manifest:
    """A parsed manifest object → Manifest, every field checked (docs/store-format.md "Manifests")."""
    _fixed(d, "", {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE}, what)
    config = _field(d, "config", dict, what)
    _fixed(config, "config.", {"mediaType": CONFIG_MEDIA_TYPE}, what)
    tensors = tuple(_tensor(layer, f"layers[{i}].", what) for i, layer in enumerate(_field(d, "layers", list, what)))
    names = [t.name for t in tensors]
    if names != sorted(set(names)):
        raise IntegrityError(f"{what}: the layers are not sorted by tensor name or name one tensor twice; "
                             "the manifest is corrupt (adapterhub writes them sorted and unique)")
    notes = dict(_field(d, "annotations", dict, what))
    for key, value in notes.items():
        if not isinstance(value, str):
            raise IntegrityError(f"{what}: annotation {key!r} is {value!r}, not a string (OCI annotations are strings)")
    task, version, created = (_field(notes, key, str, what, "annotations.") for key in (TASK, VERSION, CREATED))
    if not _VERSION_TEXT.fullmatch(version):
        raise IntegrityError(f"{what}: annotation {VERSION!r} is {version!r}, not a version number like '3'")
    for key in (TASK, VERSION, CREATED):
        del notes[key]
    return Manifest(task, int(version), created, _digest(config, "config.", what), _size(config, "config.", what),
                    tensors, notes)


def _tensor(layer: Any, where: str, what: str) -> TensorDescriptor:
    _fixed(layer, where, {"mediaType": TENSOR_MEDIA_TYPE}, what)
    notes = _field(layer, "annotations", dict, what, where)
    name, dtype, shape_text = (_field(notes, key, str, what, where + "annotations.") for key in (T_NAME, T_DTYPE, T_SHAPE))
    if dtype not in WIDTH:
        raise IntegrityError(f"{what}: tensor {name!r} has dtype {dtype!r}; expected one of {sorted(WIDTH)}")
    try:
        shape = json.loads(shape_text)
    except ValueError:
        shape = None
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise IntegrityError(f"{what}: tensor {name!r} has shape {shape_text!r}; expected a JSON list of sizes")
    size, needed = _size(layer, where, what), math.prod(shape) * DTYPES[dtype][1]
    if size != needed:
        raise IntegrityError(f"{what}: tensor {name!r} is {dtype}{shape}, {needed} bytes, but its descriptor "
                             f"says size {size}; the manifest is inconsistent")
    return TensorDescriptor(name, dtype, tuple(shape), _digest(layer, where, what), size)


def _field(obj: Any, key: str, kind: type, what: str, where: str = "") -> Any:
    """obj[key], which must exist and be a `kind` (IntegrityError naming the field otherwise)."""
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what}: {where.rstrip('.') or 'the top level'} is a {type(obj).__name__}, not a JSON "
                             "object; the blob is corrupt")
    if key not in obj:
        raise IntegrityError(f"{what}: field '{where}{key}' is missing; the blob is corrupt or was not written by "
                             "adapterhub")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise IntegrityError(f"{what}: field '{where}{key}' is {_short(value)}, expected a JSON {kind.__name__}")
    return value


def _fixed(obj: Any, where: str, expected: Mapping[str, Any], what: str) -> None:
    """Fields whose value is fixed by this format version (schema version, media types)."""
    for key, value in expected.items():
        found = _field(obj, key, type(value), what, where)
        if found != value:
            raise IntegrityError(f"{what}: field '{where}{key}' is {found!r}, expected {value!r}; not an adapterhub "
                                 "format-1 manifest (written by another tool or a newer adapterhub?)")


def _digest(obj: dict, where: str, what: str) -> Digest:
    value = _field(obj, "digest", str, what, where)
    if not is_digest(value):
        raise IntegrityError(f"{what}: field '{where}digest' is {_short(value)}, not 'sha256:<64 lowercase hex>'")
    return Digest(value)


def _size(obj: dict, where: str, what: str) -> int:
    value = _field(obj, "size", int, what, where)
    if value < 0:
        raise IntegrityError(f"{what}: field '{where}size' is {value}, expected a byte count >= 0")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_blob(adapter: Adapter) -> bytes:
    """The OCI config blob: PEFT config as read, the base fingerprint (the adapter's base identity where known,
    and the shapes of its modules; docs/store-format.md "Base identity") and the model card when there is one.
    Parts that are unknown are left out, so an adapter without them has the same blob as before they existed."""
    config = adapter.config
    identity = adapter.base.to_json() if adapter.base is not None else {}
    base = {"name_or_path": config.base_model_name_or_path, **identity,
            "modules": {module: list(shape) for module, shape in sorted(adapter.module_shapes().items())}}
    blob = {"formatVersion": FORMAT_VERSION, "peft_config": config.to_dict(), "base": base}
    if adapter.model_card is not None:
        blob["model_card"] = adapter.model_card
    return canonical_json(blob)


def config_identity(blob: Mapping[str, Any]) -> BaseIdentity | None:
    """The base identity a parsed config blob records (None when it records nothing)."""
    return BaseIdentity.from_json(blob.get("base"))


def config_card(blob: Mapping[str, Any]) -> str | None:
    card = blob.get("model_card")
    return card if isinstance(card, str) else None


def parse_config_blob(data: bytes, what: str) -> dict[str, Any]:
    """The config blob as a dict: `formatVersion` (must be this version's) and `peft_config` (an object)."""
    try:
        d = json.loads(data)
    except ValueError as error:
        raise IntegrityError(f"{what}: the adapter config blob is not JSON ({error}); the blob is corrupt") from None
    version = _field(d, "formatVersion", object, what)
    if version != FORMAT_VERSION:
        raise IntegrityError(f"{what}: adapter config blob has formatVersion {_short(version)}, this adapterhub reads "
                             f"{FORMAT_VERSION}; upgrade adapterhub (or the blob is corrupt)")
    _field(d, "peft_config", dict, what)
    return d


def annotation_strings(annotations: Mapping[str, Any] | None) -> dict[str, str]:
    """OCI annotations are string → string: non-string values are stored as their JSON text."""
    out = {}
    for key, value in (annotations or {}).items():
        if not isinstance(key, str) or key.startswith("org.adapterhub.") or key == CREATED:
            raise ConfigError(f"annotation key {key!r} is reserved or not a string; use your own key, e.g. 'eval.acc'")
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out
