"""ORAS file artifacts: a PEFT directory as an OCI artifact whose layers are whole files, each named by
its ``org.opencontainers.image.title`` annotation, which is what ``oras push`` writes and ``oras pull``
reads (docs/store-format.md "ORAS").

Two ways in and one way out, no HTTP here (oci.py does the requests):

- **Read** (`peft_files`, `translate`): an artifact whose layers include the files ``adapter_config.json``
  and ``adapter_model.safetensors`` (pushed by ``oras push``, or by ``adapterhub copy --oras-files``) is
  read as an adapterhub version: the two files are parsed and presented as the per-tensor manifest a push
  of that directory would make. Any other artifact is refused in one line naming its artifactType and
  media types (`describe`).
- **Write** (`files_manifest`): the file-per-layer variant of one version, for ``copy --oras-files``:
  config = the adapterhub config blob, layers = the two PEFT files with titles, annotations = the
  version's. Translating it back gives the version's own manifest, byte for byte.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from adapterhub.adapter import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterConfig
from adapterhub.errors import AdapterFormatError, ConfigError, IntegrityError
from adapterhub.registry.digest import Digest, is_digest
from adapterhub.registry.manifest import (
    ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, CREATED, MANIFEST_MEDIA_TYPE, TASK, VERSION, Manifest, TensorDescriptor,
    canonical_json, config_blob, config_card, config_identity, parse_config_blob,
)
from adapterhub.registry.oci_client import one_line
from adapterhub.safetensors_io import read_safetensors

TITLE = "org.opencontainers.image.title"
FILES_ARTIFACT_TYPE = "application/vnd.adapterhub.adapter.files.v1"
FILE_MEDIA_TYPES = {CONFIG_FILE: "application/vnd.adapterhub.peft.config.v1+json",
                    WEIGHTS_FILE: "application/vnd.adapterhub.peft.safetensors.v1",
                    CARD_FILE: "text/markdown"}
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # required; the model card (README.md) travels when there is one


def is_adapterhub(d: Any) -> bool:
    """Whether a parsed manifest claims to be adapterhub's per-tensor format (manifest.py checks the rest)."""
    return isinstance(d, dict) and d.get("artifactType") == ARTIFACT_TYPE


def describe(d: Any) -> str:
    """artifactType, config media type and layer media types (with titles) of a manifest, on one line."""
    if not isinstance(d, dict):
        return f"a JSON {type(d).__name__}, not a manifest object"
    config = d.get("config") if isinstance(d.get("config"), dict) else {}
    layers = [layer for layer in d.get("layers") or [] if isinstance(layer, dict)] if isinstance(d.get("layers"), list) else []
    shown = []
    for layer in layers[:6]:
        title = (layer.get("annotations") or {}).get(TITLE) if isinstance(layer.get("annotations"), dict) else None
        shown.append(f"{layer.get('mediaType')}" + (f" ({title})" if title else ""))
    more = f" and {len(layers) - 6} more" if len(layers) > 6 else ""
    return one_line(f"artifactType {d.get('artifactType')!r}, mediaType {d.get('mediaType')!r}, config "
                    f"{config.get('mediaType')!r}, layers [{', '.join(shown)}{more}]", 400)


def peft_files(d: Any, what: str) -> dict[str, tuple[Digest, int]]:
    """{file name: (digest, size)} of the two PEFT files of a file artifact; IntegrityError describing
    anything else (a container image, a chart, a file artifact of other files)."""
    found: dict[str, tuple[Digest, int]] = {}
    layers = d.get("layers") if isinstance(d, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        notes = layer.get("annotations") if isinstance(layer, dict) else None
        title = notes.get(TITLE) if isinstance(notes, dict) else None
        digest, size = layer.get("digest"), layer.get("size")
        if title in (*PEFT_FILES, CARD_FILE) and isinstance(digest, str) and is_digest(digest) and type(size) is int and size >= 0:
            if title in found:
                raise IntegrityError(f"{what}: two layers are titled {title!r}; an ORAS PEFT artifact has one each")
            found[title] = (Digest(digest), size)
    if sorted(set(found) - {CARD_FILE}) != sorted(PEFT_FILES):
        raise IntegrityError(f"{what} is not an adapter: {describe(d)}; adapterhub reads its own manifests "
                             f"(artifactType {ARTIFACT_TYPE}) and ORAS file artifacts with layers titled "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    return found


def version_of(d: dict) -> int | None:
    """The version an artifact states itself (`copy --oras-files` writes it); None for plain `oras push`."""
    notes = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
    text = notes.get(VERSION)
    return int(text) if isinstance(text, str) and text.isdigit() and not text.startswith("0") else None


def translate(d: dict, files: Mapping[str, bytes], task: str, version: int, what: str,
              config_data: bytes | None = None) -> tuple[Manifest, dict[Digest, bytes]]:
    """The per-tensor manifest of a file artifact (as a push of its PEFT directory would write it, stamped
    with `version` and the artifact's creation time and annotations) and the raw blobs that manifest names.
    `config_data`: the artifact's config blob when it is adapterhub's (`copy --oras-files`), whose base
    identity is kept; the model card is the README.md layer (or the blob's)."""
    try:
        config = AdapterConfig.from_dict(json.loads(files[CONFIG_FILE]))
        tensors, _ = read_safetensors(files[WEIGHTS_FILE], f"{what} {WEIGHTS_FILE}")
        blob = parse_config_blob(config_data, what) if config_data is not None else {}
        card = files[CARD_FILE].decode("utf-8") if CARD_FILE in files else config_card(blob)
        adapter = Adapter(config, tensors, base=config_identity(blob), model_card=card)
    except ValueError as error:  # JSON, UTF-8, ConfigError and AdapterFormatError are ValueErrors
        raise AdapterFormatError(f"{what}: its PEFT files are not a valid adapter: {one_line(str(error))}") from None
    notes = dict(d.get("annotations") or {})
    if notes.get(TASK, task) != task:
        raise IntegrityError(f"{what}: the artifact belongs to task {notes[TASK]!r} but is stored under task "
                             f"{task!r}; copy it into {notes[TASK]!r} instead")
    bad = sorted(key for key, value in notes.items() if not (isinstance(key, str) and isinstance(value, str)))
    if bad:
        raise IntegrityError(f"{what}: annotations {bad} are not strings (OCI annotations are strings)")
    created = notes.pop(CREATED, "")
    for key in (TASK, VERSION):
        notes.pop(key, None)
    config_data = config_blob(adapter)
    blobs = {Digest.of(config_data): config_data}
    descriptors = []
    for name, tensor in adapter.tensors.items():
        digest = Digest.of(tensor.data)
        blobs[digest] = tensor.data
        descriptors.append(TensorDescriptor(name, tensor.dtype, tensor.shape, digest, len(tensor.data)))
    manifest = Manifest(task, version, created, Digest.of(config_data), len(config_data), tuple(descriptors), notes)
    return manifest, blobs


def files_manifest(manifest: Manifest, adapter: Adapter) -> tuple[bytes, dict[Digest, bytes]]:
    """The file-per-layer artifact of one version: (canonical manifest bytes, {digest: blob}).

    The config blob and the annotations are the version's own, so `translate` gives `manifest` back; the
    files are what `Registry.pull` writes, so ``oras pull`` makes the same PEFT directory.
    """
    config_data = config_blob(adapter)
    files = adapter.peft_files()
    if Digest.of(config_data) != manifest.config_digest:
        raise ConfigError(f"{manifest.task}@v{manifest.version}: its config blob is not the one this adapterhub "
                          "writes for it; re-push the adapter before copying it with --oras-files")
    layers = [{"mediaType": FILE_MEDIA_TYPES[name], "digest": Digest.of(data), "size": len(data),
               "annotations": {TITLE: name}} for name, data in files.items()]
    data = canonical_json({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": FILES_ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": manifest.config_digest, "size": manifest.config_size},
        "layers": layers,
        "annotations": {**manifest.annotations, TASK: manifest.task, VERSION: str(manifest.version),
                        CREATED: manifest.created},
    })
    return data, {manifest.config_digest: config_data, **{Digest.of(v): v for v in files.values()}}
