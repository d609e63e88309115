"""Tiny models and data for the training tests: a Llama with GQA and a Qwen2 (qkv bias, tied embeddings)."""

from __future__ import annotations

import dataclasses

import torch

from adapterhub.runtime.model.config import ModelConfig
from adapterhub.train.data import IGNORE, Dataset, Example

LLAMA = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128,
)
QWEN2 = dataclasses.replace(LLAMA, architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True)
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2}

# (use_dora, use_rslora) per variant
VARIANTS = {"lora": (False, False), "rslora": (False, True), "dora": (True, False)}


def random_dataset(vocab: int, n: int = 8, seed: int = 0) -> Dataset:
    """Examples of 5..12 tokens whose first 1..3 tokens are an unlabelled prompt (so padding and masking matter)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        T = int(torch.randint(5, 13, (1,), generator=g))
        ids = torch.randint(0, vocab, (T,), generator=g).tolist()
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        examples.append(Example(tuple(ids), tuple([IGNORE] * prompt + ids[prompt:])))
    return Dataset("random", "sha256:" + "0" * 64, tuple(examples))
