"""AdapterLinear: a base weight (dense or NF4) plus stacked per-slot adapters, one batched forward for all rows.

Semantics (per row b with slot n = ids[b]; slot 0 = no adapter: zero A/B, dora_scale 1):
    y[b] = dora_scale[n] * (x[b] W^T + scaling[n] * (x[b] A[n]^T) B[n]^T) + bias
DoRA's scale m / ||W + s B A||_row does not depend on x, so it is computed once per slot when the
pool installs the adapter (SEMANTICS §5.3); the forward multiplies by it, before adding the bias.
The ops and their rounding are documented in runtime/kernels.py (the sum base + LoRA is rounded once).

Adapter stacks are grouped by rank (padding every slot to the largest rank made the r=16 rows of a
batch 2.2-2.5x slower once one r=64 adapter was loaded; bench/mixed_batch.py's layer sizes). Per rank R
a RankGroup holds, with local slot 0 = "no adapter":
    A (Ng, R, Din), BT (Ng, R, Dout) = lora_B transposed, scaling (Ng,) fp32, dora (Ng, Dout) fp32,
    slot_map (N,) int64: pool slot -> local slot (0 when the slot's adapter is in another group).
The forward runs the kernels' ops once per rank group (not per adapter); a row adds zero in the groups
its adapter is not in, and gets its DoRA scale in its own group, after its own LoRA term.
Stacks live in the compute dtype: adapters run at base precision (PEFT keeps them in fp32; in bf16 that
costs about one bf16 ulp of the LoRA term, and makes every adapter GEMM a bf16 GEMM). They are grown
by the pool between forwards, on the device of the base weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from adapterhub.runtime import kernels, lora_math

if TYPE_CHECKING:
    from adapterhub.runtime.nf4 import NF4Weight

NF4_BLOCKSIZE = 64  # what transformers + bitsandbytes use for QLoRA (SEMANTICS §1.3, §3.2)


@dataclass
class RankGroup:
    """The adapters of one rank in one layer (see the module docstring)."""

    A: torch.Tensor  # (Ng, R, Din)
    BT: torch.Tensor  # (Ng, R, Dout)
    scaling: torch.Tensor  # (Ng,) fp32
    dora: torch.Tensor  # (Ng, Dout) fp32
    slot_map: torch.Tensor  # (N,) int64
    locals: dict[int, int] = field(default_factory=dict)  # pool slot -> local slot
    dora_locals: set[int] = field(default_factory=set)

    def free_local(self) -> int:
        used = set(self.locals.values())
        return next(i for i in range(1, self.A.shape[0] + 1) if i not in used)


class AdapterLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype=torch.bfloat16, device="cpu"):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.nf4: NF4Weight | None = None  # set by load_nf4; then `weight` is None
        self.clear_adapters()

    # --- base weight -------------------------------------------------------------------------------

    @property
    def is_nf4(self) -> bool:
        return self.nf4 is not None

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.weight is not None else self.nf4_packed.device

    def load_dense(self, w: torch.Tensor) -> None:
        """Adopt a dense (Dout, Din) weight (any float dtype, stored in the compute dtype); drops adapters."""
        self.set_dense_weight(w)
        self.clear_adapters()

    def load_nf4(self, w_or_state: torch.Tensor | Mapping[str, torch.Tensor] | NF4Weight) -> None:
        """Quantize a dense (Dout, Din) weight to NF4 (blocksize 64, double quant, in the compute dtype, as
        transformers does with bnb_4bit_compute_dtype = dtype), or adopt an NF4Weight, or a bitsandbytes
        state dict keyed relative to this module ("weight", "weight.absmax", ..., optional "bias";
        SEMANTICS §3.1). Drops adapters."""
        from adapterhub.runtime import nf4  # lazily: nf4 is only needed by NF4 bases

        if isinstance(w_or_state, torch.Tensor):
            q = nf4.quantize(w_or_state.to(device=self.device, dtype=self.dtype), blocksize=NF4_BLOCKSIZE, double_quant=True)
        elif isinstance(w_or_state, nf4.NF4Weight):
            q = w_or_state
        else:
            q = nf4.NF4Weight.from_state_dict(w_or_state, prefix="weight")
            if "bias" in w_or_state and self.bias is not None:
                self.bias.data = w_or_state["bias"].to(device=self.device, dtype=self.dtype).contiguous()
        self.set_nf4_weight(q)
        self.clear_adapters()

    def set_dense_weight(self, w: torch.Tensor) -> None:
        """Replace the base weight, keeping the adapter stacks (merge / unmerge)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != (out, in) = ({self.out_features}, {self.in_features})")
        device = self.device
        self.nf4 = None
        for name in ("nf4_packed", "nf4_absmax"):
            self._buffers.pop(name, None)
        self.weight = nn.Parameter(w.to(device=device, dtype=self.dtype).contiguous(), requires_grad=False)

    def set_nf4_weight(self, q: NF4Weight) -> None:
        """Replace the base weight by an NF4 one, keeping the adapter stacks (merge / unmerge)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight shape {tuple(q.shape)} != (out, in) = ({self.out_features}, {self.in_features})")
        device = self.device
        self.nf4, self.weight = q, None
        # The forward reads only these two: packed nibbles and the float32 absmax decoded once here,
        # never per forward (SEMANTICS §2.1 step 5).
        self.register_buffer("nf4_packed", q.packed.reshape(-1).to(device).contiguous(), persistent=False)
        self.register_buffer("nf4_absmax", q.absmax_float32().to(device, torch.float32).contiguous(), persistent=False)

    def nf4_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The bitsandbytes-format keys of this layer (SEMANTICS §3.1), e.g. prefix "model.layers.0.mlp.up_proj."."""
        if self.nf4 is None:
            raise ValueError("nf4_state_dict needs an NF4 base weight; this layer holds a dense one (load_nf4 first)")
        sd = dict(self.nf4.state_dict(prefix + "weight"))
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        return sd

    def dequantized_weight(self) -> torch.Tensor:
        """(Dout, Din) in the compute dtype: the W every formula uses (a new tensor for NF4)."""
        if self.nf4 is None:
            return self.weight
        out = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=self.device)
        return kernels.nf4_dequantize(self.nf4_packed, self.nf4_absmax, self.nf4.blocksize, out)

    # --- adapter stacks (written by runtime/pool.py) -------------------------------------------------

    def clear_adapters(self) -> None:
        """Only slot 0 ("no adapter")."""
        self.num_slots = 1  # pool slots this layer accepts in `ids` (0..num_slots-1)
        self.rank_groups: dict[int, RankGroup] = {}

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_groups)

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

    @torch.inference_mode(False)
    def install(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None) -> None:
        """Write one adapter into pool slot `slot`. A (R, Din), B (Dout, R), magnitude (Dout,) | None, float32.
        The DoRA scale comes from dequantized_weight() (SEMANTICS §5.2-5.3: for NF4 the dequantized W)."""
        self.uninstall(slot)
        group = self.rank_groups.get(A.shape[0]) or self._new_group(A.shape[0])
        local = group.free_local()
        if local == group.A.shape[0]:
            self._grow(group)
        group.A[local] = A.to(self.device, self.dtype)
        group.BT[local] = B.T.to(self.device, self.dtype)
        group.scaling[local] = float(scaling)
        if magnitude is not None:
            W = self.dequantized_weight()
            group.dora[local] = lora_math.dora_scale(W, A.to(W.device), B.to(W.device), scaling, magnitude.to(W.device))
            group.dora_locals.add(local)
        group.locals[slot] = local
        group.slot_map[slot] = local

    @torch.inference_mode(False)
    def uninstall(self, slot: int) -> None:
        """Reset pool slot `slot` to "no adapter"; ids up to `slot` become valid for this layer."""
        self.reserve(slot + 1)
        for R, group in list(self.rank_groups.items()):
            local = group.locals.pop(slot, None)
            if local is None:
                continue
            group.A[local], group.BT[local], group.scaling[local], group.dora[local] = 0.0, 0.0, 0.0, 1.0
            group.slot_map[slot] = 0
            group.dora_locals.discard(local)
            if not group.locals:
                del self.rank_groups[R]

    def _new_group(self, R: int) -> RankGroup:
        dev = self.device
        group = RankGroup(
            A=torch.zeros(1, R, self.in_features, dtype=self.dtype, device=dev),
            BT=torch.zeros(1, R, self.out_features, dtype=self.dtype, device=dev),
            scaling=torch.zeros(1, dtype=torch.float32, device=dev),
            dora=torch.ones(1, self.out_features, dtype=torch.float32, device=dev),
            slot_map=torch.zeros(self.num_slots, dtype=torch.int64, device=dev),
        )
        self.rank_groups[R] = group
        return group

    @staticmethod
    def _grow(group: RankGroup) -> None:
        """One more local slot (new tensors: a forward in flight keeps the old ones)."""
        group.A = torch.cat([group.A, torch.zeros_like(group.A[:1])])
        group.BT = torch.cat([group.BT, torch.zeros_like(group.BT[:1])])
        group.scaling = torch.cat([group.scaling, torch.zeros_like(group.scaling[:1])])
        group.dora = torch.cat([group.dora, torch.ones_like(group.dora[:1])])

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, Din) [or (B, Din)], ids (B,) int64 slot per row or None (all rows slot 0) -> (B, T, Dout)."""
        groups = list(self.rank_groups.values()) if ids is not None else []
        # DoRA scales the output before the bias is added (SEMANTICS §5.3); otherwise the GEMM adds it.
        late_bias = self.bias is not None and (self.nf4 is not None or any(g.dora_locals for g in groups))
        if self.nf4 is None:
            y = torch.nn.functional.linear(x, self.weight, None if late_bias else self.bias)  # (B, T, Dout)
        else:
            y = kernels.nf4_linear(x, self.nf4_packed, self.nf4_absmax, self.nf4.blocksize, self.out_features, self.in_features)
        if groups:
            x3 = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, Din)
            y3 = y.view(y.shape[0], -1, self.out_features)  # (B, T, Dout)
            for g in groups:  # one per distinct rank, not per adapter
                local = g.slot_map.index_select(0, ids)  # (B,)
                h = kernels.lora_shrink(x3, g.A, local)  # (B, T, R)
                kernels.lora_expand(y3, h, g.BT, local, g.scaling, g.dora if g.dora_locals else None)
        if late_bias:
            y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        kind = "nf4" if self.nf4 is not None else "dense"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, dtype={self.dtype}, slots={self.num_slots}, ranks={self.ranks}")
