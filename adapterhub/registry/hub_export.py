"""One version to the Hugging Face Hub as a PEFT repo: ``adapterhub copy REF --to hf://org/name[@branch]``.

The repo gets what `Registry.pull` writes (``adapter_config.json``, ``adapter_model.safetensors``, byte for
byte) and a model card (``README.md``) whose metadata says ``library_name: peft`` and the base model, and
whose lineage table names the adapterhub version, its manifest digest, creation time and annotations
(an adapter imported from the Hub keeps its ``hf.*`` lineage). Uploading is huggingface_hub's:
`HfApi.create_repo` (exist_ok) and one `upload_folder` commit, with ``HF_TOKEN`` / ``HF_ENDPOINT`` read
when the command runs (hub.HubSettings).

Tested against a local stub of the Hub's HTTP endpoints (tests/registry/test_hub_export.py); not yet
against the live Hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from adapterhub.adapter import CONFIG_FILE, WEIGHTS_FILE, Adapter
from adapterhub.errors import RemoteError
from adapterhub.registry.hub import HubSettings, HubSource, one_line
from adapterhub.registry.manifest import Manifest
from adapterhub.registry.refs import ResolvedRef

CARD_FILE = "README.md"


def model_card(source: HubSource, ref: ResolvedRef, manifest: Manifest, adapter: Adapter) -> str:
    """README.md: Hub metadata (YAML front matter) and the lineage of the version, as Markdown."""
    from huggingface_hub import ModelCardData

    config = adapter.config
    kind = "DoRA" if config.use_dora else ("rsLoRA" if config.use_rslora else "LoRA")
    metadata = ModelCardData(library_name="peft", base_model=config.base_model_name_or_path,
                             tags=["adapterhub", kind.lower()])
    rows = [("adapterhub version", f"`{ref}`"), ("manifest digest", f"`{ref.digest}`"),
            ("created", manifest.created)]
    rows += [(f"annotation `{key}`", _cell(value)) for key, value in sorted(manifest.annotations.items())]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (f"---\n{metadata.to_yaml()}\n---\n\n# {source.repo_id}\n\n"
            f"A {kind} adapter (r={config.r}, lora_alpha={config.lora_alpha}, {len(adapter.module_shapes())} "
            f"modules) exported by adapterhub from `{ref}`. Load it with PEFT: "
            f"`PeftModel.from_pretrained(base_model, \"{source.repo_id}\")`.\n\n"
            f"## Lineage\n\n| field | value |\n|---|---|\n{table}\n")


def _cell(value: str) -> str:
    """An annotation value inside a Markdown table cell: one line, no column separators."""
    return " ".join(value.split()).replace("|", "\\|")


def upload(ref: ResolvedRef, manifest: Manifest, adapter: Adapter, url: str,
           settings: HubSettings | None = None) -> str:
    """Create the repo if missing and commit the PEFT files and the card in one commit; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    settings = settings or HubSettings.from_env()
    source = HubSource.parse(url)
    if settings.is_offline:
        raise RemoteError(f"cannot upload {ref} to {source}: HF_HUB_OFFLINE=1 is set; unset it (and set HF_TOKEN "
                          "to a token with write access)")
    files = {CONFIG_FILE: adapter.config_json().encode(), WEIGHTS_FILE: adapter.safetensors_bytes(),
             CARD_FILE: model_card(source, ref, manifest, adapter).encode()}
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    with tempfile.TemporaryDirectory(prefix="adapterhub-hf-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            api.create_repo(source.repo_id, repo_type="model", exist_ok=True)
            commit = api.upload_folder(repo_id=source.repo_id, folder_path=tmp, repo_type="model",
                                       revision=source.revision,
                                       commit_message=f"adapterhub: {ref} ({ref.digest})")
        except (HfHubHTTPError, OSError) as error:
            raise RemoteError(f"upload of {ref} to {source} failed: {type(error).__name__}: "
                              f"{one_line(str(error), 240)}; check HF_TOKEN (write access) and the repo name") from None
    return str(commit.commit_url)
