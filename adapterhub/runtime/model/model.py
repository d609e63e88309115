"""The decoder (every family of model/families.py) with Hugging Face module names.

Module paths equal the HF ones (`model.layers.0.self_attn.q_proj`, `lm_head`, ...), so a PEFT key maps
to a module by stripping `base_model.model.`. Every decoder projection is an `AdapterLinear`, called
as `proj(x, ids)`: one batched forward for all rows, each row with its own adapter slot. The model is
built on the meta device with plain `nn.Linear` shape holders there; the loader swaps in an
`AdapterLinear` holding each real weight (model/loader.py). The layers are in model/layers.py.

Positions are per row. Without a cache they follow the attention mask (cumsum - 1, as HF generate
builds them for a padded batch); with a cache, row b's new tokens sit at `starts[b] + 0..T-1`.
Masks are additive and finite (dtype min), so a query with no visible key stays finite. Sliding-window
layers also hide keys `sliding_window` or more indices back (transformers' `sliding_window_overlay`).

A decode step (one token per row on the paged KVCache, no autograd, CPU, bf16 or fp32, no attention soft-cap)
runs the layers' `decode` on the fused ops of kernels/decode.py, where the compiled library runs: no masks,
RoPE's cos / sin once per step, keys read from their blocks in place; where model/decode_stack.py covers the
model and the step, every layer in one compiled call instead. `use_decode_kernels(None)` keeps every step on
the torch layers, the twin (tests/runtime/test_decode_fused.py, test_decode_stack.py compare them);
`use_decode_kernels(K, whole_step=False)` the per-op step. The head of a bf16
forward of few rows (decode, a prefill's last tokens) runs the final norm and lm_head on those ops too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapterhub.runtime import kernels
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.kernels import decode as decode_ops
from adapterhub.runtime.kernels import decode_layer
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.decode_stack import DecodeStack
from adapterhub.runtime.model.kv_cache import CacheStep, KVCache
from adapterhub.runtime.model.layers import DecodeStep, DecoderLayer, norm
from adapterhub.runtime.model.rope import rope_cos_sin, rope_inv_freq


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, device) for _ in range(c.num_hidden_layers))
        self.norm = norm(c, c.hidden_size, dtype, device)


class Transformer(nn.Module):
    """Build with device="meta"; model/loader.py swaps in real modules and weights (no double allocation)."""

    def __init__(self, config: ModelConfig, dtype=torch.bfloat16, device="meta"):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.model = Decoder(config, dtype, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.lm_head.weight.requires_grad_(False)
        self.register_buffer("inv_freq", None, persistent=False)  # (Dh/2,) float32, set by `materialize`
        self.register_buffer("local_inv_freq", None, persistent=False)  # windowed layers' (Gemma 3), or None
        # Training: recompute each decoder layer in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False
        self.decode_kernels: decode_ops.DecodeKernels | None = None  # set by `materialize` where they run
        self.decode_stack: DecodeStack | None = None  # the whole step in one call, where it runs (model/decode_stack.py)

    def materialize(self, device) -> None:
        """Gives every module still on meta real (uninitialised) storage and ties the output embedding."""
        for module in self.modules():
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=device, recurse=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        c = self.config
        self.inv_freq = rope_inv_freq(c.rope_theta, c.head_dim, c.rope_scaling).to(device)
        if c.local_rope_theta is not None:
            self.local_inv_freq = rope_inv_freq(c.local_rope_theta, c.head_dim).to(device)
        is_cpu = torch.device(device).type == "cpu"
        is_fusable = is_cpu and self.dtype in decode_ops.DTYPES and c.attn_logit_softcapping is None
        self.use_decode_kernels(decode_ops.kernels() if is_fusable else None)

    def use_decode_kernels(self, ops: decode_ops.DecodeKernels | None, *, whole_step: bool = True) -> None:
        """Run decode steps (and few-row bf16 heads) on these fused ops; None: on the torch layers (the twin).
        whole_step: every layer in one compiled call where model/decode_stack.py covers the model and the step;
        False keeps the per-op step (its twin)."""
        self.decode_kernels = ops
        kernel = decode_layer.kernel() if ops is not None and whole_step else None
        self.decode_stack = None if kernel is None else DecodeStack(self, kernel)

    def projections(self) -> dict[str, nn.Module]:
        """Every decoder projection by HF module path: shape holders before loading, AdapterLinear after."""
        return {f"model.layers.{i}.{p}": self.get_submodule(f"model.layers.{i}.{p}")
                for i in range(self.config.num_hidden_layers) for p in self.config.family.projections}

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
        go to cache `rows` (B,) after each row's current length (their blocks allocated here), or where `step`
        (from `cache.step`, after `cache.allocate`) says.
        The caller advances `cache.lengths` (runtime/generate.py's prefill / decode do).
        """
        x = self.hidden_states(input_ids, ids, cache, rows, attention_mask, step)  # (B, T, D)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, D)
        logits = self.head(x)  # (B, T, V)
        return logits[:, 0] if logits_at is not None else logits

    def hidden_states(self, input_ids, ids=None, cache: KVCache | None = None, rows=None, attention_mask=None,
                      step: CacheStep | None = None) -> torch.Tensor:
        """The last decoder layer's output (B, T, D), before the final norm: what `head` turns into logits
        (arguments as `forward`'s). Training computes the head on the labelled positions only (train/loss.py)."""
        B, T = input_ids.shape
        if cache is not None and step is None:
            lengths = cache.lengths[torch.as_tensor(rows, dtype=torch.long).cpu()]  # (B,)
            cache.allocate(rows, lengths + T)  # a paged cache's blocks for the new positions
            step = cache.step(rows, T)
        if self._decodes_fused(cache, T):
            return self._decode(input_ids, ids, cache, step)
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
        rope = rope_cos_sin(positions, self.inv_freq, self.dtype)
        local = rope if self.local_inv_freq is None else rope_cos_sin(positions, self.local_inv_freq, self.dtype)
        x = self._embed(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.model.layers):
            is_windowed = i in self.config.sliding_layers
            args = (x, ids, local if is_windowed else rope, windowed if is_windowed else mask, cache, step, i)
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x

    def _decodes_fused(self, cache, T: int) -> bool:
        """Whether this forward is a decode step the fused ops run (module docstring)."""
        return (T == 1 and self.decode_kernels is not None and isinstance(cache, KVCache)
                and cache.k.dtype == self.dtype and not torch.is_grad_enabled())

    def _decode(self, input_ids, ids, cache: KVCache, step: CacheStep) -> torch.Tensor:
        """hidden_states of one token per row through the layers' fused `decode`.  # (B, 1) -> (B, 1, D)"""
        c, B = self.config, input_ids.shape[0]
        rope = rope_cos_sin(step.positions, self.inv_freq, self.dtype)  # (B, 1, 1, Dh) each, once per step
        if self.local_inv_freq is None and self.decode_stack is not None and self.decode_stack.supports(ids, B):
            return self.decode_stack.run(self._embed(input_ids), ids, cache, step, rope)
        local = rope if self.local_inv_freq is None else rope_cos_sin(step.positions, self.local_inv_freq, self.dtype)
        scratch = lambda n: torch.empty(B, 1, n, dtype=self.dtype, device=self.device)  # noqa: E731
        shared = DecodeStep(self.decode_kernels, cache, step.positions.reshape(B).contiguous(),
                            step.tables.contiguous(), step.span, rope, local, c.sliding_window,
                            frozenset(c.sliding_layers), scratch(c.hidden_size),
                            scratch(c.num_attention_heads * c.head_dim), scratch(c.intermediate_size))
        x, h = self._embed(input_ids), None  # (B, 1, D): a new tensor, the residual stream added to in place
        for i, layer in enumerate(self.model.layers):
            h = layer.decode(x, h, ids, shared, i)
        return x.add_(h)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) last layer's output -> (..., V) logits: the final norm, lm_head, Gemma 2's soft-cap."""
        fused, W = self.decode_kernels, self.lm_head.weight
        rows = x.numel() // x.shape[-1]
        if fused is not None and x.dtype == torch.bfloat16 and rows <= decode_ops.GEMV_MAX_ROWS \
                and not torch.is_grad_enabled() and W.is_contiguous():
            logits = fused.linear_bf16(self.model.norm.decode(fused, x), W)  # (..., V): one pass over W
        else:  # the ops' bucketed GEMM (kernels/ops.py: Ops.linear): a full forward has B*T rows here
            logits = kernels.ops_for(self.device).linear(self.model.norm(x), W)  # (..., V)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2, in the logits' dtype
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if not self.config.family.scales_embeddings:
            return x
        # Gemma: sqrt(D) is a float32 scalar rounded to the model dtype before the multiply (55.5 for D=3072 in bf16).
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)


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
