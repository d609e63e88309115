"""The Llama-family decoder (Llama, Mistral, Qwen2) with Hugging Face module names.

Module paths equal the HF ones (`model.layers.0.self_attn.q_proj`, `lm_head`, ...), so a PEFT key maps
to a module by stripping `base_model.model.`. Every decoder projection is an `AdapterLinear`, called
as `proj(x, ids)`: one batched forward for all rows, each row with its own adapter slot. The model is
built on the meta device with plain `nn.Linear` shape holders there; the loader swaps in an
`AdapterLinear` holding each real weight (model/loader.py).

Positions are per row. Without a cache they follow the attention mask (cumsum - 1, as HF generate
builds them for a padded batch); with a cache, row b's new tokens sit at `starts[b] + 0..T-1`.
Masks are additive and finite (dtype min), so a query with no visible key stays finite. Sliding-window
layers also hide keys `sliding_window` or more indices back (transformers' `sliding_window_overlay`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime import kernels
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.kv_cache import CacheStep, KVCache

# The decoder projections of every layer (HF names; what "all-linear" targets, semantics §6.4).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF: normalise in float32, round to the input dtype, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(Dh/2,) float32 inverse frequencies, with Llama 3.1 scaling when configured."""
    Dh = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.int64).float() / Dh)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * torch.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    old_len = s.original_max_position_embeddings
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE.  # (B, h, T, Dh), (B, 1, T, Dh) -> (B, h, T, Dh)"""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.H, self.Hkv, self.Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(c.hidden_size, self.H * self.Dh, c.attention_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, self.Hkv * self.Dh, c.attention_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, self.Hkv * self.Dh, c.attention_bias, **kw)
        self.o_proj = nn.Linear(self.H * self.Dh, c.hidden_size, c.has_o_bias, **kw)

    def forward(self, x, ids, rope, mask, cache: KVCache | None, step: CacheStep | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x, ids).view(B, T, self.H, self.Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x, ids).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x, ids).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, step, k, v)  # (B, Hkv, span, Dh)
        # Query head h reads KV head h // (H / Hkv), as HF's repeat_kv.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.H != self.Hkv)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh), ids)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, **kw)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, **kw)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, **kw)

    def forward(self, x, ids):
        return self.down_proj(F.silu(self.gate_proj(x, ids)) * self.up_proj(x, ids), ids)  # (B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.self_attn = Attention(c, dtype, device)
        self.mlp = MLP(c, dtype, device)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)

    def forward(self, x, ids, rope, mask, cache, step, layer):
        x = x + self.self_attn(self.input_layernorm(x), ids, rope, mask, cache, step, layer)
        return x + self.mlp(self.post_attention_layernorm(x), ids)


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, device) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)


class Transformer(nn.Module):
    """Build with device="meta"; model/loader.py swaps in real modules and weights (no double allocation)."""

    def __init__(self, config: ModelConfig, dtype=torch.bfloat16, device="meta"):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.model = Decoder(config, dtype, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.lm_head.weight.requires_grad_(False)
        self.register_buffer("inv_freq", None, persistent=False)  # (Dh/2,) float32, set by `materialize`

    def materialize(self, device) -> None:
        """Gives every module still on meta real (uninitialised) storage and ties the output embedding."""
        for module in self.modules():
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=device, recurse=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def projections(self) -> dict[str, nn.Module]:
        """Every decoder projection by HF module path: shape holders before loading, AdapterLinear after."""
        return {f"model.layers.{i}.{p}": self.get_submodule(f"model.layers.{i}.{p}")
                for i in range(self.config.num_hidden_layers) for p in PROJECTIONS}

    def linears(self) -> dict[str, AdapterLinear]:
        """Every decoder projection of a loaded model by HF module path (the adapter pool's targets)."""
        return {name: m for name, m in self.projections().items() if isinstance(m, AdapterLinear)}

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids, ids=None, cache: KVCache | None = None, rows=None, attention_mask=None,
                step: CacheStep | None = None, logits_at=None) -> torch.Tensor:
        """Logits (B, T, V), or (B, V) at the positions `logits_at` (B,) when given.

        input_ids (B, T); ids (B,) adapter slot per row or None (base only). Without a cache,
        `attention_mask` (B, T) 1/0 marks real tokens (left or right padding). With a cache, the tokens
        go to cache `rows` (B,) after each row's current length, or where `step` (from `cache.step`) says.
        The caller advances `cache.lengths` (runtime/generate.py's prefill / decode do).
        """
        B, T = input_ids.shape
        if cache is not None and step is None:
            step = cache.step(rows, T)
        if cache is None:
            positions, visible, distance = _positions_and_visible(attention_mask, B, T, self.device)
        else:
            positions = step.positions  # (B, T)
            keys = torch.arange(step.span, device=self.device)
            distance = positions[:, :, None] - keys[None, None, :]  # (B, T, span): query index - key index
            visible = distance >= 0  # causal; keys past a row's length are ahead of all its queries
        mask = _additive(visible, self.dtype)
        window = self.config.sliding_window
        windowed = None if window is None else _additive(visible & (distance < window), self.dtype)
        rope = self._rope(positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ids, rope, windowed if i in self.config.sliding_layers else mask, cache, step, i)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, D)
        # lm_head through the ops' bucketed GEMM (kernels/ops.py: Ops.linear): a full forward has B*T rows here.
        logits = kernels.ops_for(self.device).linear(self.model.norm(x), self.lm_head.weight)  # (B, T, V)
        return logits[:, 0] if logits_at is not None else logits

    def _rope(self, positions: torch.Tensor):
        """cos, sin (B, 1, T, Dh) in the compute dtype, computed in float32 as HF does."""
        angles = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, Dh/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, Dh)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)


def _additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """(B, T, S) bool -> (B, 1, T, S) additive mask; dtype min (not -inf) keeps empty rows finite."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None]


def _positions_and_visible(attention_mask, B: int, T: int, device):
    """Positions (B, T), visible keys (B, T, T) and query - key index distances (1 or B, T, T)."""
    index = torch.arange(T, device=device)
    distance = (index[:, None] - index[None, :])[None]  # (1, T, T)
    causal = distance >= 0
    if attention_mask is None:
        return index.expand(B, T), causal.expand(B, T, T), distance
    real = attention_mask.to(device=device, dtype=torch.bool)  # (B, T)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return positions, causal & real[:, None, :], distance
