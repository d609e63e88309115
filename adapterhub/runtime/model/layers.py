"""The decoder layer and its parts, with Hugging Face module names; a family's traits (model/families.py)
pick the variant of each part at construction, so `forward` never asks which model it is.

Every decoder projection is an `AdapterLinear` after loading, called as `proj(x, ids)`: one batched forward
for all rows, each row with its own adapter slot (a plain `nn.Linear` shape holder on the meta device before).
What each variant computes, and the transformers source it follows, is in docs/semantics.md §12.

`decode` (one token per row on the paged cache, no autograd) is the same layer through the fused CPU ops of
kernels/decode.py: the norms, rotary + the cache write + attention, and SiLU(gate) * up are one call each,
the residual stream is one (B, D) tensor added to in place, and the projections run as in `forward`.
Model.forward picks it (model/model.py); `forward` is its twin, and the tests compare the two. Where
model/decode_stack.py covers a model, one compiled call runs this same sequence for every layer (its twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.kernels.decode import DecodeKernels
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.kv_cache import CacheStep, KVCache
from adapterhub.runtime.model.rope import apply_rope

# config.json activation name -> function (transformers' ACT2FN entries of the same name).
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device, *, is_offset: bool = False):
        super().__init__()
        self.eps, self.is_offset = eps, is_offset
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.is_offset:  # Gemma: scale by (1 + w) in float32, then round once to the input dtype
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)  # Llama: round to the input dtype, then scale

    def decode(self, kernels: DecodeKernels, x, *, residual=None, out=None) -> torch.Tensor:
        """forward(x) by the fused op, after `x += residual` in place when given."""
        if residual is None:
            x = x.contiguous()
        else:
            residual = residual.contiguous()
        return kernels.rmsnorm(x, self.weight, self.eps, residual=residual, is_offset=self.is_offset, out=out)


def norm(c: ModelConfig, dim: int, dtype, device) -> RMSNorm:
    return RMSNorm(dim, c.rms_norm_eps, dtype, device, is_offset=c.family.has_offset_norm)


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's eager attention: softmax(cap * tanh(q k^T scale / cap) + mask) v, the softmax in float32.
    # (B, H, T, Dh), (B, Hkv, S, Dh), (B, Hkv, S, Dh), (B, 1, T, S) -> (B, H, T, Dh)"""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, H, S, Dh)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap + mask  # (B, H, T, S)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@dataclass(frozen=True)
class DecodeStep:
    """What every layer of one fused decode step shares, built once per step by the model."""

    kernels: DecodeKernels
    cache: KVCache
    positions: torch.Tensor  # (B,) int64: each row's new position
    tables: torch.Tensor  # (B, nt) int64: each row's blocks, in position order
    span: int  # max(positions) + 1: the keys the torch path reads (its attention's blocks depend on it)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, 1, 1, Dh)
    local_rope: tuple[torch.Tensor, torch.Tensor]  # the windowed layers' (Gemma 3), else `rope`
    window: int | None  # the windowed layers' sliding window
    sliding_layers: frozenset[int]
    normed: torch.Tensor  # (B, 1, D) scratch: each norm's output, read by the projections before the next
    attended: torch.Tensor  # (B, 1, H*Dh) scratch: attention's output
    activated: torch.Tensor  # (B, 1, F) scratch: act(gate) * up


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.H, self.Hkv, self.Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.is_fused = "self_attn.qkv_proj" in c.family.projections
        self.has_qk_norm = c.family.has_qk_norm
        # None keeps SDPA's own 1/sqrt(Dh); query_pre_attn_scalar replaces Dh there (Gemma).
        self.scale = None if c.query_pre_attn_scalar is None else c.attention_scale
        self.softcap = c.attn_logit_softcapping
        kw = dict(dtype=dtype, device=device)
        q, kv, D = self.H * self.Dh, self.Hkv * self.Dh, c.hidden_size
        if self.is_fused:
            self.qkv_proj = nn.Linear(D, q + 2 * kv, False, **kw)  # rows: q, then k, then v
        else:
            self.q_proj = nn.Linear(D, q, c.attention_bias, **kw)
            self.k_proj = nn.Linear(D, kv, c.attention_bias, **kw)
            self.v_proj = nn.Linear(D, kv, c.attention_bias, **kw)
        self.o_proj = nn.Linear(q, D, c.has_o_bias, **kw)
        if self.has_qk_norm:
            self.q_norm, self.k_norm = norm(c, self.Dh, dtype, device), norm(c, self.Dh, dtype, device)

    def _qkv(self, x, ids):
        if self.is_fused:
            return self.qkv_proj(x, ids).split([self.H * self.Dh, self.Hkv * self.Dh, self.Hkv * self.Dh], dim=-1)
        return self.q_proj(x, ids), self.k_proj(x, ids), self.v_proj(x, ids)

    def forward(self, x, ids, rope, mask, cache: KVCache | None, step: CacheStep | None, layer: int):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, ids)
        q = q.view(B, T, self.H, self.Dh)  # (B, T, H, Dh)
        k, v = k.view(B, T, self.Hkv, self.Dh), v.view(B, T, self.Hkv, self.Dh)  # (B, T, Hkv, Dh)
        if self.has_qk_norm:  # per head over Dh, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, Dh)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, step, k, v)  # (B, Hkv, span, Dh)
        if self.softcap is None:
            # Query head h reads KV head h // (H / Hkv), as HF's repeat_kv.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.H != self.Hkv)  # (B, H, T, Dh)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale or self.Dh**-0.5, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh), ids)

    def decode(self, x, ids, step: DecodeStep, layer: int) -> torch.Tensor:
        """forward for one token per row through the fused op.  # (B, 1, D) -> (B, 1, D)"""
        q, k, v = self._qkv(x, ids)  # (B, 1, H*Dh), (B, 1, Hkv*Dh) x 2
        if self.has_qk_norm:  # per head over Dh, before RoPE
            q = self.q_norm.decode(step.kernels, q.contiguous().view(-1, self.Dh)).view(q.shape)
            k = self.k_norm.decode(step.kernels, k.contiguous().view(-1, self.Dh)).view(k.shape)
            v = v.contiguous()  # the kernel reads k and v rows with one stride
        is_windowed = layer in step.sliding_layers
        cos, sin = step.local_rope if is_windowed else step.rope
        scale = self.scale or 1 / math.sqrt(self.Dh)  # SDPA's default, as it computes it
        y = step.kernels.attention(q, k, v, cos, sin, step.cache.k, step.cache.v, layer, step.positions, step.tables,
                                   step.span, heads=self.H, kv_heads=self.Hkv, scale=scale,
                                   window=step.window if is_windowed else None, out=step.attended)
        return self.o_proj(y, ids)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.act = ACTIVATIONS[c.hidden_act]
        self.is_fused = "mlp.gate_up_proj" in c.family.projections
        D, F_ = c.hidden_size, c.intermediate_size
        if self.is_fused:
            self.gate_up_proj = nn.Linear(D, 2 * F_, False, **kw)  # rows: gate, then up
        else:
            self.gate_proj = nn.Linear(D, F_, c.mlp_bias, **kw)
            self.up_proj = nn.Linear(D, F_, c.mlp_bias, **kw)
        self.down_proj = nn.Linear(F_, D, c.mlp_bias, **kw)

    def forward(self, x, ids):
        if self.is_fused:
            gate, up = self.gate_up_proj(x, ids).chunk(2, dim=-1)  # (B, T, F) each
        else:
            gate, up = self.gate_proj(x, ids), self.up_proj(x, ids)
        return self.down_proj(self.act(gate) * up, ids)  # (B, T, D)

    def decode(self, x, ids, step: DecodeStep) -> torch.Tensor:
        """forward for one token per row, SiLU(gate) * up fused.  # (B, 1, D) -> (B, 1, D)"""
        if self.is_fused:
            gate, up = self.gate_up_proj(x, ids).chunk(2, dim=-1)  # (B, 1, F) each
        else:
            gate, up = self.gate_proj(x, ids), self.up_proj(x, ids)
        if self.act is F.silu:
            return self.down_proj(step.kernels.silu_mul(gate, up, out=step.activated), ids)
        return self.down_proj(self.act(gate) * up, ids)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.self_attn = Attention(c, dtype, device)
        self.mlp = MLP(c, dtype, device)
        self.input_layernorm = norm(c, c.hidden_size, dtype, device)
        self.post_attention_layernorm = norm(c, c.hidden_size, dtype, device)
        self.has_sandwich_norms = c.family.has_sandwich_norms
        if self.has_sandwich_norms:
            self.pre_feedforward_layernorm = norm(c, c.hidden_size, dtype, device)
            self.post_feedforward_layernorm = norm(c, c.hidden_size, dtype, device)

    def forward(self, x, ids, rope, mask, cache, step, layer):
        h = self.self_attn(self.input_layernorm(x), ids, rope, mask, cache, step, layer)
        if not self.has_sandwich_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x), ids)
        # Gemma: post_attention_layernorm normalises the attention output; the MLP gets its own pre and post norms.
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ids))

    def decode(self, x, h, ids, step: DecodeStep, layer: int) -> torch.Tensor:
        """forward for one token per row on the fused ops, its residual add deferred: x (B, 1, D) is the stream
        before this layer, updated in place to x + h (the previous layer's output, None for the first); returns
        this layer's output, to add to x (the next layer's norm does, or the model at the end)."""
        K = step.kernels
        a = self.self_attn.decode(self.input_layernorm.decode(K, x, residual=h, out=step.normed), ids, step, layer)
        if not self.has_sandwich_norms:
            return self.mlp.decode(self.post_attention_layernorm.decode(K, x, residual=a, out=step.normed), ids, step)
        a = self.post_attention_layernorm.decode(K, a)
        m = self.mlp.decode(self.pre_feedforward_layernorm.decode(K, x, residual=a, out=step.normed), ids, step)
        return self.post_feedforward_layernorm.decode(K, m)
