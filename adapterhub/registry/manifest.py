"""Manifests and config blobs: canonical JSON in OCI image-manifest shape (docs/store-format.md).

A version is one OCI image manifest: `config` points at the adapter config blob (the PEFT
adapter_config.json and the base fingerprint), `layers` are the raw tensor blobs in key order, each
annotated with its PEFT key, dtype and shape. Task, version and creation time are manifest annotations,
so the same bytes push unchanged to any OCI distribution registry (tags `vN`, `latest`, user tags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from adapterhub.adapter import Adapter
from adapterhub.errors import ConfigError, IntegrityError
from adapterhub.registry.digest import Digest

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
    def from_json(cls, data: bytes, what: str) -> Manifest:
        try:
            d = json.loads(data)
            notes = dict(d["annotations"])
            tensors = tuple(TensorDescriptor(
                layer["annotations"][T_NAME], layer["annotations"][T_DTYPE],
                tuple(json.loads(layer["annotations"][T_SHAPE])), Digest(layer["digest"]), int(layer["size"]))
                for layer in d["layers"])
            task, version, created = notes.pop(TASK), int(notes.pop(VERSION)), notes.pop(CREATED)
            config = d["config"]
            if d.get("schemaVersion") != 2 or config.get("mediaType") != CONFIG_MEDIA_TYPE:
                raise ValueError("not an adapterhub manifest (schemaVersion / config mediaType)")
            return cls(task, version, created, Digest(config["digest"]), int(config["size"]), tensors, notes)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(f"{what}: malformed manifest ({type(error).__name__}: {error})") from None


def config_blob(adapter: Adapter) -> bytes:
    """The OCI config blob: PEFT config as read, plus the base fingerprint (DESIGN.md "Base fingerprint")."""
    config = adapter.config
    base = {"name_or_path": config.base_model_name_or_path,
            "modules": {module: list(shape) for module, shape in sorted(adapter.module_shapes().items())}}
    return canonical_json({"formatVersion": FORMAT_VERSION, "peft_config": config.to_dict(), "base": base})


def parse_config_blob(data: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(data)
        if d["formatVersion"] != FORMAT_VERSION:
            raise ValueError(f"formatVersion {d['formatVersion']} is not {FORMAT_VERSION}")
        if not isinstance(d["peft_config"], dict):
            raise ValueError("peft_config is not an object")
        return d
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"{what}: malformed adapter config blob ({error})") from None


def annotation_strings(annotations: Mapping[str, Any] | None) -> dict[str, str]:
    """OCI annotations are string → string: non-string values are stored as their JSON text."""
    out = {}
    for key, value in (annotations or {}).items():
        if not isinstance(key, str) or key.startswith("org.adapterhub.") or key == CREATED:
            raise ConfigError(f"annotation key {key!r} is reserved or not a string; use your own key, e.g. 'eval.acc'")
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out
