"""AdapterLinear: a base weight (any quant/ format) plus stacked per-slot adapters, one batched forward for all rows.

Semantics (per row b with slot n = ids[b]; slot 0 = no adapter: zero A/B, dora_scale 1):
    y[b] = dora_scale[n] * (x[b] W^T + scaling[n] * (x[b] A[n]^T) B[n]^T) + bias
DoRA's scale m / ||W + s B A||_row does not depend on x, so it is computed once per slot when the
pool installs the adapter (semantics §5.3); the forward multiplies by it, before adding the bias.
The ops and their rounding are documented in kernels/ops.py (the sum base + LoRA is rounded once);
the layer runs them through `self.ops`, its device's (kernels.ops_for).

Adapter stacks are grouped by rank (padding every slot to the largest rank made the r=16 rows of a
batch 2.2-2.5x slower once one r=64 adapter was loaded; bench/mixed_batch.py's layer sizes). Per rank R
a RankGroup holds, with local slot 0 = "no adapter":
    A (Ng, R, Din), BT (Ng, R, Dout) = lora_B transposed, scaling (Ng,) fp32, dora (Ng, Dout) fp32,
    slot_map (N,) int64: pool slot -> local slot (0 when the slot's adapter is in another group).
The forward runs the kernels' ops once per rank group (not per adapter); a row adds zero in the groups
its adapter is not in, and gets its DoRA scale in its own group, after its own LoRA term.
Stacks live in `adapter_dtype`, grown by the pool (adapters/pool.py) between forwards, on the device of
the base weight. By default that is the compute dtype (every adapter GEMM a bf16 GEMM, the compiled CPU
kernels). PEFT keeps adapter weights in float32 inside a bf16 model, casts x to float32 for the LoRA
term and adds it to the bf16 base output in float32, rounding once (peft/tuners/lora/layer.py, `Linear.
forward`; docs/semantics.md §10); bf16 stacks round the adapter's weights and its term, and greedy output
drifted from PEFT's after ~9 tokens on a 135M model. `adapter_dtype=float32` computes as PEFT does:
    y = (y_base.float() + ((x.float() A[n]^T) B[n]^T) * scaling[n]).to(dtype)     (times dora_scale: DoRA)
with PEFT's GEMMs: its rows of each adapter gathered (all rows when one adapter serves the batch), then
F.linear by lora_A (R, Din) and by lora_B kept as PEFT stores it, (Dout, R) (group field `B`; `BT` is unused).
A GEMM's rounding depends on its shapes and layouts (rows, transposed operands): the Ops' stacked forms gave
terms one fp32 ulp off, which a bf16 rounding near a tie turned into a different greedy token. This is a loop
over the distinct adapters of a batch, the price of PEFT's numerics (bench/mixed_batch.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.adapters import lora_math
from adapterhub.runtime.adapters.trainable import TrainableAdapter
from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Ops
from adapterhub.runtime.quant import formats
from adapterhub.runtime.quant.weight import BaseWeight


@dataclass
class RankGroup:
    """The adapters of one rank in one layer (see the module docstring)."""

    A: torch.Tensor  # (Ng, R, Din)
    BT: torch.Tensor | None  # (Ng, R, Dout); None when adapter_dtype != dtype (then B)
    scaling: torch.Tensor  # (Ng,) fp32
    dora: torch.Tensor  # (Ng, Dout) fp32
    slot_map: torch.Tensor  # (N,) int64
    B: torch.Tensor | None = None  # (Ng, Dout, R): lora_B as PEFT stores it, when adapter_dtype != dtype
    locals: dict[int, int] = field(default_factory=dict)  # pool slot -> local slot
    dora_locals: set[int] = field(default_factory=set)

    def free_local(self) -> int:
        used = set(self.locals.values())
        return next(i for i in range(1, self.A.shape[0] + 1) if i not in used)


class AdapterLinear(nn.Module):
    """A frozen base weight (any `BaseWeight` format) plus stacked per-slot adapters."""

    # Moves whenever any layer's weight, stacks (new tensors) or adapters change: model/decode_stack.py keeps
    # raw pointers to them and rebuilds its descriptors when this differs from what it built at (one int compare
    # per step instead of a walk over every layer).
    generation: ClassVar[int] = 0

    @staticmethod
    def _changed() -> None:
        AdapterLinear.generation += 1

    def __setattr__(self, name, value):
        if name == "trainable":  # set by train/ while training: forward then ignores the stacks
            AdapterLinear._changed()
        super().__setattr__(name, value)

    def __init__(self, weight: BaseWeight, bias: torch.Tensor | None = None, *, dtype: torch.dtype = torch.bfloat16,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype  # compute dtype: activations, dequantized W
        self.adapter_dtype = adapter_dtype or dtype  # adapter stacks and the LoRA term (module docstring)
        self.weight = weight
        self.ops = kernels.ops_for(weight.device)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.device, dtype).contiguous(), requires_grad=False)
        self.trainable: TrainableAdapter | None = None  # set while training (adapters/trainable.py)
        self.clear_adapters()

    @classmethod
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, *, dtype: torch.dtype = torch.bfloat16,
                   quantize: str | None = None) -> AdapterLinear:
        """A layer over a dense (Dout, Din) weight stored in format `quantize` (quant/formats.py; None: dense)."""
        return cls(formats.format_class(quantize).quantize(W, dtype=dtype), bias, dtype=dtype)

    # --- base weight -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def replace_weight(self, weight: BaseWeight) -> None:
        """Swap the base weight for one of the same shape, keeping the adapter stacks (merge / unmerge)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != (out, in) = ({self.out_features}, {self.in_features})")
        self.weight = weight
        self._changed()

    def dequantized_weight(self) -> torch.Tensor:
        """(Dout, Din) in the compute dtype: the W every formula uses (may alias a dense weight's storage)."""
        return self.weight.dequantize(self.dtype)

    def use_ops(self, ops: Ops) -> None:
        """Run this layer's LoRA ops through `ops` (tests pin the torch twin with it)."""
        self.ops = ops

    # --- adapter stacks (written by adapters/pool.py) -------------------------------------------------

    def clear_adapters(self) -> None:
        """Only slot 0 ("no adapter")."""
        self.num_slots = 1  # pool slots this layer accepts in `ids` (0..num_slots-1)
        self.rank_groups: dict[int, RankGroup] = {}
        self._changed()

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_groups)

    def set_adapter_dtype(self, dtype: torch.dtype) -> None:
        """Where the stacks live and the LoRA term is computed; only while no adapter is installed."""
        if self.rank_groups and dtype != self.adapter_dtype:
            raise ValueError(f"cannot change the adapter dtype to {dtype} with adapters installed; remove them first")
        self.adapter_dtype = dtype
        self._changed()

    @property
    def adapter_nbytes(self) -> int:
        """Bytes of the adapter stacks (every rank group, with its free local slots)."""
        return sum(t.nbytes for g in self.rank_groups.values() for t in (g.A, g.BT, g.B, g.scaling, g.dora, g.slot_map)
                   if t is not None)

    # The pool may run inside torch.inference_mode (a serving thread) or outside it: stacks are always
    # created as normal tensors, so either context can update them in place later.
    @torch.inference_mode(False)
    def reserve(self, num_slots: int) -> None:
        """Accept pool slots up to num_slots - 1 in `ids` (a slot no adapter of this layer uses adds zero)."""
        if num_slots <= self.num_slots:
            return
        for g in self.rank_groups.values():
            g.slot_map = torch.cat([g.slot_map, g.slot_map.new_zeros(num_slots - self.num_slots)])
        self.num_slots = num_slots
        self._changed()

    @torch.inference_mode(False)
    def install(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None) -> None:
        """Write one adapter into pool slot `slot`. A (R, Din), B (Dout, R), magnitude (Dout,) | None, float32.
        The DoRA scale comes from dequantized_weight() (semantics §5.2-5.3: for NF4 the dequantized W)."""
        self.uninstall(slot)
        group = self.rank_groups.get(A.shape[0]) or self._new_group(A.shape[0])
        local = group.free_local()
        if local == group.A.shape[0]:
            self._grow(group)
        group.A[local] = A.to(self.device, self.adapter_dtype)
        if group.B is not None:
            group.B[local] = B.to(self.device, self.adapter_dtype)
        else:
            group.BT[local] = B.T.to(self.device, self.adapter_dtype)
        group.scaling[local] = float(scaling)
        if magnitude is not None:
            W = self.dequantized_weight()
            group.dora[local] = lora_math.dora_scale(W, A.to(W.device), B.to(W.device), scaling, magnitude.to(W.device))
            group.dora_locals.add(local)
        group.locals[slot] = local
        group.slot_map[slot] = local
        self._changed()  # in place, but a DoRA adapter moves the bias after the LoRA terms

    @torch.inference_mode(False)
    def uninstall(self, slot: int) -> None:
        """Reset pool slot `slot` to "no adapter"; ids up to `slot` become valid for this layer."""
        self.reserve(slot + 1)
        for R, group in list(self.rank_groups.items()):
            local = group.locals.pop(slot, None)
            if local is None:
                continue
            group.A[local], group.scaling[local], group.dora[local] = 0.0, 0.0, 1.0
            (group.BT if group.B is None else group.B)[local] = 0.0
            group.slot_map[slot] = 0
            group.dora_locals.discard(local)
            if not group.locals:
                del self.rank_groups[R]
            self._changed()

    def _new_group(self, R: int) -> RankGroup:
        dev, is_wide = self.device, self.adapter_dtype != self.dtype
        group = RankGroup(
            A=torch.zeros(1, R, self.in_features, dtype=self.adapter_dtype, device=dev),
            BT=None if is_wide else torch.zeros(1, R, self.out_features, dtype=self.adapter_dtype, device=dev),
            B=torch.zeros(1, self.out_features, R, dtype=self.adapter_dtype, device=dev) if is_wide else None,
            scaling=torch.zeros(1, dtype=torch.float32, device=dev),
            dora=torch.ones(1, self.out_features, dtype=torch.float32, device=dev),
            slot_map=torch.zeros(self.num_slots, dtype=torch.int64, device=dev),
        )
        self.rank_groups[R] = group
        self._changed()
        return group

    @staticmethod
    def _grow(group: RankGroup) -> None:
        """One more local slot (new tensors: a forward in flight keeps the old ones)."""
        group.A = torch.cat([group.A, torch.zeros_like(group.A[:1])])
        if group.BT is not None:
            group.BT = torch.cat([group.BT, torch.zeros_like(group.BT[:1])])
        if group.B is not None:
            group.B = torch.cat([group.B, torch.zeros_like(group.B[:1])])
        group.scaling = torch.cat([group.scaling, torch.zeros_like(group.scaling[:1])])
        group.dora = torch.cat([group.dora, torch.ones_like(group.dora[:1])])
        AdapterLinear._changed()

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, Din) [or (B, Din)], ids (B,) int64 slot per row or None (all rows slot 0) -> (B, T, Dout)."""
        if self.trainable is not None:  # training: one adapter for every row, with autograd (ids unused)
            return self.trainable(x, self.weight, self.bias)
        groups = list(self.rank_groups.values()) if ids is not None else []
        # DoRA scales the output before the bias is added (semantics §5.3); otherwise the matmul adds it.
        late_bias = self.bias is not None and any(g.dora_locals for g in groups)
        y = self.weight.matmul(x, None if late_bias else self.bias)  # (B, T, Dout)
        if groups:
            x3 = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, Din)
            y3 = y.view(y.shape[0], -1, self.out_features)  # (B, T, Dout)
            if self.adapter_dtype == self.dtype:  # the stacks' layout (_new_group): BT, else B
                for g in groups:  # one per distinct rank, not per adapter
                    local = g.slot_map.index_select(0, ids)  # (B,)
                    h = self.ops.lora_shrink(x3, g.A, local)  # (B, T, R)
                    self.ops.lora_expand(y3, h, g.BT, local, g.scaling, g.dora if g.dora_locals else None)
            else:
                y3.copy_(self._wide_adapters(x3, y3, ids, groups))  # rounded once, as PEFT
        if late_bias:
            y.add_(self.bias)
        return y

    def _wide_adapters(self, x3: torch.Tensor, y3: torch.Tensor, ids: torch.Tensor, groups) -> torch.Tensor:
        """y3 + every row's LoRA term in adapter_dtype with PEFT's GEMMs (module docstring), per distinct adapter.
        # (B, T, Din), (B, T, Dout) -> (B, T, Dout) in adapter_dtype"""
        xw, acc = x3.to(self.adapter_dtype), y3.to(self.adapter_dtype)
        Bsz = x3.shape[0]
        for g in groups:
            local = g.slot_map.index_select(0, ids).tolist()  # (B,) host: the rows of each adapter
            for n in sorted(set(local) - {0}):
                rows = [b for b, m in enumerate(local) if m == n]
                index = None if len(rows) == Bsz else torch.tensor(rows, device=acc.device)
                xs = xw if index is None else xw.index_select(0, index)  # (Bn, T, Din)
                term = F.linear(F.linear(xs, g.A[n]), g.B[n]) * float(g.scaling[n])  # (Bn, T, Dout)
                if n in g.dora_locals:  # DoRA after its LoRA term: dora * (y + term)
                    rows_acc = acc if index is None else acc.index_select(0, index)
                    scaled = (rows_acc + term) * g.dora[n]
                    acc.copy_(scaled) if index is None else acc.index_copy_(0, index, scaled)
                elif index is None:
                    acc.add_(term)
                else:
                    acc.index_add_(0, index, term)  # each row once: an exact fp32 add
        return acc

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.format}, dtype={self.dtype}, adapter_dtype={self.adapter_dtype}, slots={self.num_slots}, ranks={self.ranks}")
