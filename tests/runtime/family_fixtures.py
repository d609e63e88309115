"""Tiny Qwen3, Gemma 2, Gemma 3 text and Phi-3 models built by transformers from a config, randomised (fp32) and
saved with `save_pretrained`, plus the byte tokenizer adapterhub's loader needs beside them.

Each config switches on what makes its family differ from Llama, at values that change the logits:
head_dim != hidden / heads, windows of 4 tokens, soft-caps of the size of the scores and logits, a
query_pre_attn_scalar != head_dim, a local RoPE base far from the global one, linear RoPE scaling.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adapterhub.runtime.model.tiny import byte_tokenizer

_COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, bos_token_id=256, eos_token_id=257, pad_token_id=258)
WINDOW = 4
NEW_FAMILIES = {
    "qwen3": dict(_COMMON, model_type="qwen3", num_hidden_layers=3, head_dim=24, rms_norm_eps=1e-6,
                  rope_theta=1000.0, tie_word_embeddings=False, use_sliding_window=True, sliding_window=WINDOW,
                  max_window_layers=1),
    "gemma2": dict(_COMMON, model_type="gemma2", num_hidden_layers=3, head_dim=32, rms_norm_eps=1e-6,
                   rope_theta=1000.0, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, tie_word_embeddings=True),
    "gemma3_text": dict(_COMMON, model_type="gemma3_text", num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                        rms_norm_eps=1e-6, query_pre_attn_scalar=12, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_theta=10000.0, rope_local_base_freq=10.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True),
    "phi3": dict(_COMMON, model_type="phi3", num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=1000.0,
                 sliding_window=WINDOW, tie_word_embeddings=False),
}
GEMMA = ("gemma2", "gemma3_text")
# PEFT target names per family: attention-only, and every decoder linear.
ATTENTION = {"phi3": ["qkv_proj", "o_proj"]}
ALL_LINEAR = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
_SEPARATE_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_SEPARATE_ALL = _SEPARATE_ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def attention_targets(family: str) -> list[str]:
    return ATTENTION.get(family, _SEPARATE_ATTENTION)


def all_targets(family: str) -> list[str]:
    return ALL_LINEAR.get(family, _SEPARATE_ALL)


def hf_model(family: str, seed: int = 0, **overrides):
    """A transformers fp32 model of the family's tiny config, every weight random and non-trivial: projections
    N(0, 0.15), norms near their identity (1, or 0 for Gemma's 1 + w), embeddings that give the residual stream
    unit scale."""
    import transformers

    config = transformers.AutoConfig.for_model(**{**NEW_FAMILIES[family], **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    D = config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if family in GEMMA else 1.0) + 0.1 * noise)
            elif "embed_tokens" in name:  # tied, also the output head (Gemma scales it back up by sqrt(D))
                p.copy_(noise / math.sqrt(D) if config.tie_word_embeddings else noise)
            elif name == "lm_head.weight":
                p.copy_(noise / math.sqrt(D))
            else:
                p.copy_(noise * max(0.15, 1 / math.sqrt(p.shape[-1])))
    return model.eval()


def hf_checkpoint(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    """hf_model saved by transformers, with the byte tokenizer beside it; returns the dir."""
    hf_model(family, seed, **overrides).save_pretrained(path)
    byte_tokenizer().save(path)
    return Path(path)
