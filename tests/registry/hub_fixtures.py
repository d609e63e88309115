"""PEFT adapters saved by PEFT itself on a tiny base, and a Hugging Face cache laid out on disk as
huggingface_hub writes it, for the Hub tests (the Hub itself cannot be reached from the test machines).

Cache layout (huggingface_hub's `file_download`: one folder per repo, files stored once by their etag):

    <HF_HOME>/hub/models--<org>--<name>/
        blobs/<etag>                      the file's bytes; etag = sha256 for LFS files (safetensors),
                                          the git blob sha1 for small text files (json, README)
        snapshots/<commit>/<file>         a relative symlink to ../../blobs/<etag>
        refs/<branch>                     the commit the branch points at (no newline)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

LFS_SUFFIXES = (".safetensors", ".bin")  # stored through git-lfs on the Hub, so their etag is the sha256


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hf_cache(hf_home: Path, repo_id: str, files: dict[str, bytes], revision: str = "main",
                   commit: str | None = None) -> str:
    """Adds one commit of `repo_id` holding `files` to the cache under `hf_home`; points `revision` at it."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit


def peft_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF cache, offline (HF_HUB_OFFLINE=1): what the test machines can do without the Hub."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return home


def tiny_base(path: Path) -> Path:
    """A tiny Llama checkpoint dir (config.json, safetensors, byte tokenizer: ids < 320) that transformers and
    adapterhub load."""
    from adapterhub.runtime.model.config import ModelConfig
    from adapterhub.runtime.model.tiny import random_checkpoint

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=112,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rms_norm_eps=1e-6, max_position_embeddings=128)
    return random_checkpoint(path, config, seed=5)


def peft_adapter(base: Path, out: Path, use_dora: bool = False, seed: int = 0) -> Path:
    """A LoRA / DoRA saved by PEFT's save_pretrained on the base, with random (non-zero) lora_B."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    peft.get_peft_model(model, config).save_pretrained(out)
    return out
