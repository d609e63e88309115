"""The decode step of every decoder layer as one compiled call (kernels/decode_layer.py), for the layers it covers.

`DecodeStack.run` is `Transformer._decode`'s layer loop (model/layers.py `DecoderLayer.decode`, each projection
an `AdapterLinear`) in one ctypes call: the descriptors of the layers (pointers to the weights, norms and adapter
stacks) are built once, and rebuilt only when `AdapterLinear.generation` moved (an adapter installed or removed,
a stack grown, a weight replaced, the adapter dtype or a trainable adapter set: each makes new tensors or changes
what a forward computes). Per step only x, the slots, the positions, the block tables and the key span change.

Which models: Llama-style layers (Llama, Mistral, Qwen2, Phi-3: separate or fused q/k/v and gate/up, optional
biases, sliding windows) whose every projection holds a 4-bit weight (NF4, FP4: blocks of 64; bf16 or fp32
activations) or a dense fp32 one, with adapter stacks in the compute dtype, and batches of up to the rows the
fused 4-bit kernel takes (`DecodeStackKernel.max_rows`). Anything else keeps the per-op step, its tested twin
(`reason` says why): q / k norms, sandwich norms, GeGLU, a local RoPE, float32 adapter stacks in a bf16 model,
more rows, and dense bf16 weights: the per-op step runs those through torch's GEMM (oneDNN), whose order of fp32
sums a C GEMV does not reproduce, and greedy decoding of the tiny model then picked the other token of an exact
bf16 tie within 12 steps (the 4-bit linears are the same C kernel on both paths: bit-identical).
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.kernels import decode_layer as dl
from adapterhub.runtime.model.kv_cache import CacheStep, KVCache
from adapterhub.runtime.quant.dense import DenseWeight
from adapterhub.runtime.quant.fourbit import FourBitWeight

_BLOCK = 64  # the fused 4-bit kernel's quantization block


class Unsupported(Exception):
    """Why a model's layers keep the per-op decode step (never raised out of this module)."""


class DecodeStack:
    """The descriptors of one model's decoder layers, and the step that runs them."""

    def __init__(self, model, kernel: dl.DecodeStackKernel):
        self.model, self.kernel = model, kernel
        self._generation: int | None = None  # AdapterLinear.generation the descriptors were built at
        self._stack: dl.StackDesc | None = None
        self._keep: list = []  # every tensor and ctypes array the descriptors point into
        self.reason: str | None = None  # why the stack does not run, when it does not
        self._local = threading.local()  # .scratch: this thread's step buffer (kept, grown)
        self._slots: int | None = None  # the shortest slot map: ids must stay below it (None: no stacks)

    def supports(self, ids: torch.Tensor | None, rows: int) -> bool:
        """Whether a decode step of `rows` rows with slots `ids` runs here (descriptors rebuilt first when stale).
        Slots out of a stack's range take the per-op step, whose gather raises the error: the C code would
        read past the slot map."""
        if self._generation != AdapterLinear.generation:
            self._rebuild()
        if self._stack is None or rows > self.kernel.max_rows[self.model.dtype == torch.bfloat16]:
            return False
        if ids is None or self._slots is None or ids.numel() == 0:
            return True
        low, high = torch.aminmax(ids)
        return 0 <= int(low) and int(high) < self._slots

    def run(self, x: torch.Tensor, ids: torch.Tensor | None, cache: KVCache, step: CacheStep,
            rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Every layer for one token per row; `supports(B)` first. x (B, 1, D) the embeddings, a new contiguous
        tensor, updated in place to the last layer's output and returned; rope cos, sin (B, 1, 1, Dh)."""
        B = x.shape[0]
        positions, tables = step.positions.reshape(B).contiguous(), step.tables.contiguous()
        if ids is not None:
            ids = ids.to(torch.int64).contiguous()
        size = self.kernel.scratch_bytes(self._stack, B)
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < size:
            scratch = self._local.scratch = torch.empty(size, dtype=torch.uint8)  # written by the C code only
        cos, sin = (t.contiguous() for t in rope)
        _, _, nblocks, bs, _ = cache.k.shape
        desc = dl.StepDesc(x.data_ptr(), B, None if ids is None else ids.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           cache.k.data_ptr(), cache.v.data_ptr(), nblocks, bs, positions.data_ptr(),
                           tables.data_ptr(), tables.shape[1], step.span, scratch.data_ptr())
        self.kernel.run(self._stack, desc)
        return x

    def _rebuild(self) -> None:
        self._generation = AdapterLinear.generation
        self._stack, self._keep, self.reason = None, [], None
        maps = [g.slot_map.numel() for m in self.model.linears().values() for g in m.rank_groups.values()]
        self._slots = min(maps) if maps else None
        try:
            self._stack, self._keep = _describe(self.model)
        except Unsupported as why:
            self.reason = str(why)


def _describe(model) -> tuple[dl.StackDesc, list]:
    """The StackDesc of `model`'s layers and what it points into. Raises Unsupported."""
    c, dtype, keep = model.config, model.dtype, []
    family = c.family
    if family.has_qk_norm or family.has_sandwich_norms or model.local_inv_freq is not None or c.hidden_act != "silu":
        raise Unsupported(f"the {family.model_type} layer (q/k norms, sandwich norms, a local RoPE or GeGLU)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise Unsupported(f"activations in {dtype}")
    layers = (dl.LayerDesc * c.num_hidden_layers)()
    keep.append(layers)
    ranks = [0]
    sliding = set(c.sliding_layers)
    for i, layer in enumerate(model.model.layers):
        attn, mlp, desc = layer.self_attn, layer.mlp, layers[i]
        desc.in_norm = _ptr(layer.input_layernorm.weight, dtype, keep)
        desc.post_norm = _ptr(layer.post_attention_layernorm.weight, dtype, keep)
        qkv = [attn.qkv_proj] if attn.is_fused else [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if mlp.is_fused else [mlp.gate_proj, mlp.up_proj]
        for j, proj in enumerate(qkv):
            desc.qkv[j] = _linear(proj, dtype, keep, ranks)
        for j, proj in enumerate(gate_up):
            desc.gate_up[j] = _linear(proj, dtype, keep, ranks)
        desc.o, desc.down = _linear(attn.o_proj, dtype, keep, ranks), _linear(mlp.down_proj, dtype, keep, ranks)
        desc.is_fused_qkv, desc.is_fused_gate_up = attn.is_fused, mlp.is_fused
        desc.window = c.sliding_window if i in sliding and c.sliding_window else 0
    scale = model.model.layers[0].self_attn.scale or 1 / math.sqrt(c.head_dim)  # SDPA's default, as decode
    stack = dl.StackDesc(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                         c.head_dim, c.intermediate_size, c.rms_norm_eps, scale, family.has_offset_norm,
                         dtype == torch.bfloat16, max(ranks), layers)
    return stack, keep


def _ptr(t: torch.Tensor, dtype: torch.dtype, keep: list) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise Unsupported(f"a {t.dtype} tensor {tuple(t.shape)} where the step needs contiguous CPU {dtype}")
    keep.append(t)
    return t.data_ptr()


def _linear(proj, dtype: torch.dtype, keep: list, ranks: list) -> dl.LinearDesc:
    """The LinearDesc of one AdapterLinear (adapters/linear.py's forward, semantics in csrc/decode_layer.c)."""
    if not isinstance(proj, AdapterLinear) or proj.trainable is not None or proj.adapter_dtype != dtype:
        raise Unsupported("a projection that is not an AdapterLinear with adapter stacks in the compute dtype")
    N, K = proj.out_features, proj.in_features
    desc = dl.LinearDesc(N=N, K=K)
    w = proj.weight
    if isinstance(w, DenseWeight) and dtype == torch.float32:
        desc.W = _ptr(w.tensor, dtype, keep)
    elif isinstance(w, DenseWeight):  # module docstring: the GEMM's order of sums decides bf16 near-ties
        raise Unsupported("dense bf16 weights (torch's GEMM sums in an order the step cannot reproduce)")
    elif isinstance(w, FourBitWeight) and w.blocksize == _BLOCK and K % _BLOCK == 0 \
            and w.codebook.values.numel() == 16 and w.packed.numel() * 2 == N * K:
        desc.packed = _ptr(w.packed, torch.uint8, keep)
        desc.absmax = _ptr(w.absmax_f32, torch.float32, keep)
        desc.code = _ptr(w.codebook.values, torch.float32, keep)
    else:
        raise Unsupported(f"a {w.format} weight the fused 4-bit kernel does not take")
    if proj.bias is not None:
        desc.bias = _ptr(proj.bias.detach(), dtype, keep)
    groups = list(proj.rank_groups.items())
    array = (dl.LoraGroup * max(len(groups), 1))()
    keep.append(array)
    for j, (R, g) in enumerate(groups):
        dora = _ptr(g.dora, torch.float32, keep) if g.dora_locals else None
        array[j] = dl.LoraGroup(_ptr(g.A, dtype, keep), _ptr(g.BT, dtype, keep), _ptr(g.scaling, torch.float32, keep),
                                dora, _ptr(g.slot_map, torch.int64, keep), R)
        ranks.append(R)
    desc.has_dora = any(g.dora_locals for _, g in groups)
    desc.ngroups, desc.groups = len(groups), ctypes.cast(array, ctypes.POINTER(dl.LoraGroup))
    return desc
