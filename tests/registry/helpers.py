"""Helpers for the registry tests: tiny Llama-shaped adapters (semantics §6.3 example shapes)."""

from __future__ import annotations

from adapterhub.adapter import random_adapter

# hidden 64, 2 layers, v_proj 2 KV heads x 16.
SHAPES = {f"model.layers.{i}.self_attn.{p}": (64 if p == "q_proj" else 32, 64)
          for i in range(2) for p in ("q_proj", "v_proj")}


def make_adapter(seed: int = 0, use_dora: bool = False, dtype: str = "float32", r: int = 8):
    return random_adapter(SHAPES, r=r, use_dora=use_dora, seed=seed, dtype=dtype)


def blob_files(root):
    return sorted(p.name for p in (root / "blobs" / "sha256").iterdir())
