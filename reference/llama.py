"""A tiny Llama-family forward in NumPy (Llama, Mistral, Qwen2, Qwen3, Phi-3), float64 throughout, HF names
and numbers.

`config` is the HF config.json dict; `weights` maps HF parameter names (`model.layers.0.self_attn.q_proj.weight`,
`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`, optional `*.bias`) to arrays.
The weights decide the variant: a bias is used wherever the weights have one (Qwen2's q/k/v bias, Llama's
`attention_bias` / `mlp_bias`); `q_norm` / `k_norm` weights normalise each query / key head before RoPE (Qwen3);
fused `qkv_proj` / `gate_up_proj` weights are split as Phi-3 splits them (q, k, v rows; gate, up halves).
Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is not modelled: keep T below the window.
Logits at padded positions are unspecified (finite).
"""

import math

import numpy as np

from reference.lora import dora_weight_norm


def _config(config):
    H = config["num_attention_heads"]
    Dh = config.get("head_dim") or config["hidden_size"] // H
    return H, config.get("num_key_value_heads") or H, Dh


def _llama3_inv_freq(inv_freq, p):
    """Llama 3.1 frequency-dependent RoPE scaling (transformers `_compute_llama3_parameters`)."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(is_medium, smoothed, scaled)


def rope_inv_freq(config):
    """(Dh/2,) inverse frequencies, from transformers 5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`."""
    p = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = p.get("rope_theta", config.get("rope_theta", 10000.0))
    Dh = _config(config)[2]
    inv_freq = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, p)
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not in the reference; supported: 'default', 'llama3'")
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """HF rotate-half RoPE.  # (B, h, T, Dh), (B, T) -> (B, h, T, Dh)"""
    angles = positions[:, None, :, None] * inv_freq  # (B, 1, T, Dh/2)
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w  # (B, T, D)


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, weights, name, adapters):
    """Base linear plus each row's adapter: b + g * (x W^T + s (x A^T) B^T), g = m / ||W + s B A||_row
    for DoRA (semantics §5.3), else 1.

    # (B, T, Din) -> (B, T, Dout); adapters[b] maps module path -> (A (R, Din), B (Dout, R), s, m | None)
    """
    W = np.asarray(weights[name + ".weight"], np.float64)  # (Dout, Din)
    y = x @ W.T  # (B, T, Dout)
    for b, row in enumerate(adapters):
        if row is None or name not in row:
            continue
        A, Bm, s, m = row[name]
        y[b] += s * ((x[b] @ np.asarray(A, np.float64).T) @ np.asarray(Bm, np.float64).T)
        if m is not None:
            y[b] *= np.asarray(m, np.float64) / dora_weight_norm(W, A, Bm, s)
    bias = weights.get(name + ".bias")
    return y if bias is None else y + np.asarray(bias, np.float64)


def attention(x, weights, prefix, config, positions, key_mask, adapters):
    """Causal GQA self-attention.  # (B, T, D) -> (B, T, D)"""
    H, Hkv, Dh = _config(config)
    Bsz, T, _ = x.shape
    heads = lambda t, h: t.reshape(Bsz, T, h, Dh).transpose(0, 2, 1, 3)  # (B, h, T, Dh)
    if prefix + "qkv_proj.weight" in weights:  # Phi-3: one projection, rows q then k then v
        qkv = linear(x, weights, prefix + "qkv_proj", adapters)  # (B, T, (H + 2 Hkv) Dh)
        q, k, v = np.split(qkv, [H * Dh, (H + Hkv) * Dh], axis=-1)
    else:
        q, k, v = (linear(x, weights, prefix + p, adapters) for p in ("q_proj", "k_proj", "v_proj"))
    q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
    if prefix + "q_norm.weight" in weights:  # Qwen3: RMSNorm over Dh of every head, before RoPE
        q = rms_norm(q, weights[prefix + "q_norm.weight"], config["rms_norm_eps"])
        k = rms_norm(k, weights[prefix + "k_norm.weight"], config["rms_norm_eps"])
    inv_freq = rope_inv_freq(config)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    # GQA: query head h reads kv head h // (H / Hkv), as HF repeat_kv does
    k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # (B, H, T, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(Dh)  # (B, H, T, T)
    allowed = np.tril(np.ones((T, T), bool))[None, None] & key_mask[:, None, None, :]  # (B, 1, T, T)
    scores = np.where(allowed, scores, np.finfo(np.float64).min)  # finite: fully padded rows stay finite
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out = (p / p.sum(axis=-1, keepdims=True)) @ v  # (B, H, T, Dh)
    out = out.transpose(0, 2, 1, 3).reshape(Bsz, T, H * Dh)  # (B, T, H*Dh)
    return linear(out, weights, prefix + "o_proj", adapters)


def mlp(x, weights, prefix, adapters):
    if prefix + "gate_up_proj.weight" in weights:  # Phi-3: one projection, gate half then up half
        gate, up = np.split(linear(x, weights, prefix + "gate_up_proj", adapters), 2, axis=-1)
    else:
        gate, up = linear(x, weights, prefix + "gate_proj", adapters), linear(x, weights, prefix + "up_proj", adapters)
    return linear(silu(gate) * up, weights, prefix + "down_proj", adapters)  # (B, T, F) -> (B, T, D)


def forward(config, weights, input_ids, attention_mask=None, adapters=None):
    """Logits of a Llama-family decoder.  # input_ids (B, T), attention_mask (B, T) 1/0 -> (B, T, V) float64

    Padding: position ids are cumsum(mask) - 1 (as HF generate builds them) and masked keys are excluded.
    adapters: one entry per row, None or {module path: (A (R, Din), B (Dout, R), scaling, magnitude | None)}.
    """
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not in the reference; only 'silu'")
    input_ids = np.asarray(input_ids)
    Bsz, T = input_ids.shape
    mask = np.ones((Bsz, T), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.float64)  # (B, T)
    adapters = [None] * Bsz if adapters is None else adapters
    eps = config["rms_norm_eps"]
    embed = np.asarray(weights["model.embed_tokens.weight"], np.float64)  # (V, D)
    x = embed[input_ids]  # (B, T, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        x = x + attention(h, weights, p + "self_attn.", config, positions, mask.astype(bool), adapters)
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        x = x + mlp(h, weights, p + "mlp.", adapters)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    head = {"lm_head.weight": embed} if config.get("tie_word_embeddings") else weights
    return linear(x, head, "lm_head", adapters)  # (B, T, V)
