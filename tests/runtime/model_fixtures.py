"""Tiny Llama-family configs and fp32 models for the runtime tests (imported by name: a unique module name,
so it cannot collide with another directory's helpers the way a shared `conftest` import does)."""

from __future__ import annotations

import torch

from adapterhub.runtime import generate as gen
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.loader import build_model
from adapterhub.runtime.model.tiny import random_checkpoint, random_weights

# One tiny config.json per family, each exercising different features: GQA + llama3 RoPE scaling + attention
# bias (Llama), head_dim != hidden/heads and a single KV head (Mistral), q/k/v bias + tied embeddings (Qwen2).
# vocab 259 fits the byte tokenizer that random_checkpoint writes.
FAMILIES = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=259, rms_norm_eps=1e-5,
        attention_bias=True, tie_word_embeddings=False, rope_theta=500.0, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        bos_token_id=256, eos_token_id=257,
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, num_hidden_layers=2, vocab_size=259,
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=259, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=64, rope_theta=1000000.0, bos_token_id=256,
        eos_token_id=257,
    ),
}


def family_config(family: str) -> ModelConfig:
    return ModelConfig.from_hf_json(FAMILIES[family])


def family_weights(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial fp32 weights (std 0.15, so every layer matters; biases non-zero)."""
    return random_weights(family_config(family), seed=seed, std=0.15)


def fp32_model(family: str, seed: int = 0):
    weights = family_weights(family, seed)
    model = build_model(family_config(family), weights.__getitem__, weights, quantize=None, dtype=torch.float32,
                        device="cpu")
    return model, weights


def greedy_decode(base, ids, prompts, rows, steps: int, forced: torch.Tensor | None = None):
    """Greedy logits (steps, B, V) and tokens (B, steps) of `prompts` on cache `rows` of a paged cache of 4-token
    blocks; `forced` (B, steps) feeds those tokens instead of the argmax (so two paths see the same inputs)."""
    cache = base.new_cache(max_batch=6, max_seq=64, block_size=4)
    with torch.inference_mode():
        logits = [gen.prefill(base.model, cache, rows, prompts, ids)]
        tokens = [logits[0].argmax(-1)]
        for i in range(1, steps):
            fed = tokens[-1] if forced is None else forced[:, i - 1]
            logits.append(gen.decode(base.model, cache, torch.tensor(rows), fed, ids))
            tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits).float(), torch.stack(tokens, 1)
