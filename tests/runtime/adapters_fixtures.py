"""Small layer sets and adapters for the adapter-side runtime tests (pool, mixed batch, merge)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.adapters.pool import AdapterPool
from reference import lora as ref_lora

# A two-layer Llama-like set of projections with GQA-sized k/v and an MLP: {module: (Dout, Din)}.
SHAPES = {
    f"model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
        "mlp.down_proj": (64, 128),
    }.items()
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Tiny full models for forward tests: Llama with GQA, and Qwen2 (q/k/v bias, tied embeddings).
LLAMA = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128,
)
QWEN2 = dataclasses.replace(LLAMA, architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True)


def base_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(o, i, generator=g) / i**0.5 for m, (o, i) in SHAPES.items()}


def make_layers(weights, *, bias: bool = False, dtype=torch.float32, nf4: bool = False, seed: int = 0):
    """{module: AdapterLinear} holding `weights` (dense, or quantized to NF4), biases N(0, 0.1) if asked."""
    g = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for m, w in weights.items():
        b = torch.randn(w.shape[0], generator=g) * 0.1 if bias else None
        layers[m] = AdapterLinear.from_dense(w, b, dtype=dtype, quantize="nf4" if nf4 else None)
    return layers


def make_pool(layers, capacity: int = 8) -> AdapterPool:
    return AdapterPool(layers, capacity)


def adapters_zoo(layers) -> dict[str, object]:
    """LoRA r=4 (q, v), rsLoRA r=8 (all linear), DoRA r=16 (all linear): different ranks and kinds."""
    W = {m: layer.dequantized_weight().float().numpy() for m, layer in layers.items()}
    return {
        "lora": random_adapter(SHAPES, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1),
        "rslora": random_adapter(SHAPES, r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True, seed=2),
        "dora": random_adapter(SHAPES, r=16, lora_alpha=32, target_modules=ALL_LINEAR, use_dora=True, seed=3, base_weights=W),
    }


def reference_output(layer: AdapterLinear, module: str, x: torch.Tensor, adapter) -> np.ndarray:
    """reference/lora.py forward (float64) of one layer for input x (..., Din) under `adapter` (or None)."""
    W = layer.dequantized_weight().double().numpy()
    bias = None if layer.bias is None else layer.bias.double().numpy()
    xs = x.double().numpy()
    m = None if adapter is None else adapter.modules().get(module)
    if m is None:
        y = xs @ W.T
        return y if bias is None else y + bias
    if m.magnitude is None:
        return ref_lora.lora_forward(xs, W, bias, m.lora_A, m.lora_B, m.scaling)
    return ref_lora.dora_forward(xs, W, bias, m.lora_A, m.lora_B, m.scaling, m.magnitude)
