"""Shared runtime fixtures: tiny Llama-family configs and Hugging Face checkpoint dirs built in code."""

from __future__ import annotations

import pytest

from adapterhub.runtime.model.tiny import random_checkpoint
from model_fixtures import FAMILIES, family_config


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def checkpoint_dir(tmp_path):
    """Factory: a Hugging Face checkpoint dir for a family (optionally sharded)."""

    def make(family: str = "llama", seed: int = 0, max_shard_bytes: int | None = None, name: str = "ckpt"):
        return random_checkpoint(tmp_path / name, family_config(family), seed=seed, max_shard_bytes=max_shard_bytes,
                                 std=0.15)

    return make
