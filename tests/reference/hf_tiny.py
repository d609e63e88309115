"""Tiny Hugging Face models (random, fp32) for the reference-vs-transformers/PEFT tests.

Only used by compat tests; each test importorskips transformers / peft itself.
"""

import numpy as np
import pytest

# One tiny config per family, each exercising a different feature: GQA + llama3 RoPE scaling + attention
# bias (Llama), head_dim != hidden/heads (Mistral), q/k/v bias + tied embeddings (Qwen2).
TINY = {
    "llama": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        rope_theta=500.0, max_position_embeddings=64,
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=64,
    ),
}


def build_hf_model(family, seed=0):
    """A random fp32 HF causal LM (eager attention) whose every parameter is non-trivial (biases too)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    config = config_cls(**TINY[family], attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("norm.weight")
            p.copy_((1.0 if is_norm else 0.0) + 0.15 * torch.randn_like(p))
    return model


def config_dict(model):
    return model.config.to_dict()


def numpy_weights(model):
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def padded_batch(vocab, lengths, T, seed=0):
    """Left-padded token ids and mask, (B, T) each; row b has lengths[b] real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return ids, mask


def hf_positions(mask):
    """Position ids as HF generate builds them for a padded batch."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)
