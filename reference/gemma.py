"""Gemma 2 and Gemma 3 text in NumPy, float64 throughout, HF names and numbers (docs/semantics.md §12.3, §12.4).

The Llama forward of reference/llama.py (its `linear` with per-row adapters, RoPE, GQA) with Gemma's
differences: embeddings times sqrt(D); every RMSNorm scales by (1 + w); a gelu-tanh gated MLP; norms on the
attention and MLP outputs and before the MLP; attention scaled by query_pre_attn_scalar^-1/2 and (Gemma 2)
soft-capped before the mask; windowed layers; soft-capped logits. Gemma 3 adds (1 + w) q/k norms per head before RoPE
and rotates its windowed layers with a second, unscaled RoPE base. Rounding to a compute dtype (where Gemma
and Llama differ, §12.3) is the runtime's business: float64 has none.

`config` is the HF config.json dict with its Gemma keys written out (as adapterhub's and transformers 5.25's
`save_pretrained` write them); `weights` maps HF parameter names to arrays.
"""

import math

import numpy as np

from reference.llama import _config, apply_rope, linear


def norm(x, w, eps):
    """Gemma RMSNorm: the stored weight w scales as (1 + w).  # (..., d) -> (..., d)"""
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * (1.0 + np.asarray(w, np.float64))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def windowed_layers(config):
    """Indices of the windowed layers: `layer_types`, else every layer but each `sliding_window_pattern`-th."""
    types = config.get("layer_types")
    if types:
        return {i for i, kind in enumerate(types) if kind == "sliding_attention"}
    pattern = config.get("sliding_window_pattern", 2 if config["model_type"] == "gemma2" else 6)
    return {i for i in range(config["num_hidden_layers"]) if (i + 1) % pattern}


def inv_freqs(config):
    """(global, local) (Dh/2,) inverse frequencies: the global ones with "linear" scaling (positions / factor)
    when configured; the local ones (Gemma 3's windowed layers) from rope_local_base_freq, unscaled."""
    Dh = _config(config)[2]
    p = config.get("rope_parameters") or {}
    full, local = (p.get("full_attention"), p.get("sliding_attention")) if "full_attention" in p else (p, None)
    full = full or config.get("rope_scaling") or {}
    base = lambda theta: 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)  # noqa: E731
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope_type {rope_type!r} is not in the reference; supported: 'default', 'linear'")
    global_freq = base(full.get("rope_theta", config.get("rope_theta", 10000.0)))
    global_freq = global_freq / full["factor"] if rope_type == "linear" else global_freq
    if config["model_type"] != "gemma3_text":
        return global_freq, global_freq
    return global_freq, base((local or {}).get("rope_theta", config.get("rope_local_base_freq", 10000.0)))


def attention(x, weights, prefix, config, positions, allowed, inv_freq, adapters):
    """Causal GQA self-attention, soft-capped scores.  # (B, T, D), allowed (B, 1, T, T) -> (B, T, D)"""
    H, Hkv, Dh = _config(config)
    Bsz, T, _ = x.shape
    heads = lambda t, h: t.reshape(Bsz, T, h, Dh).transpose(0, 2, 1, 3)  # (B, h, T, Dh)
    q, k, v = (linear(x, weights, prefix + p, adapters) for p in ("q_proj", "k_proj", "v_proj"))
    q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
    if prefix + "q_norm.weight" in weights:  # Gemma 3
        q = norm(q, weights[prefix + "q_norm.weight"], config["rms_norm_eps"])
        k = norm(k, weights[prefix + "k_norm.weight"], config["rms_norm_eps"])
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # (B, H, T, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(config["query_pre_attn_scalar"])  # (B, H, T, T)
    if config["model_type"] == "gemma2":  # Gemma 3's attention never applies its cap (semantics §12.4)
        scores = softcap(scores, config.get("attn_logit_softcapping"))  # before the mask
    scores = np.where(allowed, scores, np.finfo(np.float64).min)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out = (p / p.sum(axis=-1, keepdims=True)) @ v  # (B, H, T, Dh)
    return linear(out.transpose(0, 2, 1, 3).reshape(Bsz, T, H * Dh), weights, prefix + "o_proj", adapters)


def forward(config, weights, input_ids, attention_mask=None, adapters=None):
    """Logits of a Gemma 2 / Gemma 3 text decoder.  # input_ids (B, T), attention_mask (B, T) 1/0 -> (B, T, V)

    Padding and adapters as reference/llama.py's `forward`; windows count key indices back from the query.
    """
    input_ids = np.asarray(input_ids)
    Bsz, T = input_ids.shape
    mask = np.ones((Bsz, T), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.float64)  # (B, T)
    adapters = [None] * Bsz if adapters is None else adapters
    eps, D = config["rms_norm_eps"], config["hidden_size"]
    index = np.arange(T)
    causal = (index[None, :] <= index[:, None])[None, None] & mask.astype(bool)[:, None, None, :]  # (B, 1, T, T)
    in_window = (index[:, None] - index[None, :] < config["sliding_window"])[None, None]  # (1, 1, T, T)
    windowed, (global_freq, local_freq) = windowed_layers(config), inv_freqs(config)
    embed = np.asarray(weights["model.embed_tokens.weight"], np.float64)  # (V, D)
    x = embed[input_ids] * math.sqrt(D)  # (B, T, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        is_local = i in windowed
        allowed, inv_freq = (causal & in_window, local_freq) if is_local else (causal, global_freq)
        h = attention(norm(x, weights[p + "input_layernorm.weight"], eps), weights, p + "self_attn.", config,
                      positions, allowed, inv_freq, adapters)
        x = x + norm(h, weights[p + "post_attention_layernorm.weight"], eps)
        h = norm(x, weights[p + "pre_feedforward_layernorm.weight"], eps)
        gate, up = linear(h, weights, p + "mlp.gate_proj", adapters), linear(h, weights, p + "mlp.up_proj", adapters)
        h = linear(gelu_tanh(gate) * up, weights, p + "mlp.down_proj", adapters)
        x = x + norm(h, weights[p + "post_feedforward_layernorm.weight"], eps)
    x = norm(x, weights["model.norm.weight"], eps)
    head = {"lm_head.weight": embed} if config.get("tie_word_embeddings", True) else weights
    return softcap(linear(x, head, "lm_head", adapters), config.get("final_logit_softcapping"))  # (B, T, V)
