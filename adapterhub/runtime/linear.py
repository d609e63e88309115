"""AdapterLinear: a base weight (dense or NF4) plus stacked per-slot adapters, one batched forward for all rows.

Semantics (per row b with slot n = ids[b]; slot 0 = no adapter: zero A/B, dora_scale 1):
    y[b] = dora_scale[n] * (x[b] W^T + scaling[n] * (x[b] A[n]^T) B[n]^T) + bias
DoRA's scale m / ||W + s B A||_row does not depend on x, so it is computed once per slot when the
pool installs the adapter (SEMANTICS §5.3); the forward multiplies by it, before adding the bias.
The ops and their rounding are documented in runtime/kernels.py (the sum base + LoRA is rounded once).

Adapter stacks (non-persistent buffers, grown by the pool between forwards; every slot is zero-padded
to the layer's largest rank, which changes no result):
    lora_A_stack (N, R, Din), lora_BT_stack (N, R, Dout) = lora_B transposed, scaling (N,) fp32,
    dora_scale (N, Dout) fp32.
Stacks live in the compute dtype: adapters run at base precision (PEFT keeps them in fp32; in bf16 that
costs about one bf16 ulp of the LoRA term, and makes every adapter GEMM a bf16 GEMM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from adapterhub.runtime import kernels, lora_math

if TYPE_CHECKING:
    from adapterhub.runtime.nf4 import NF4Weight

NF4_BLOCKSIZE = 64  # what transformers + bitsandbytes use for QLoRA (SEMANTICS §1.3, §3.2)


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
        return self.lora_A_stack.device

    def load_dense(self, w: torch.Tensor) -> None:
        """Adopt a dense (Dout, Din) weight (any float dtype, stored in the compute dtype); drops adapters."""
        self._move_stacks_off_meta(w.device)
        self.set_dense_weight(w)
        self.clear_adapters()

    def load_nf4(self, w_or_state: torch.Tensor | Mapping[str, torch.Tensor] | NF4Weight) -> None:
        """Quantize a dense (Dout, Din) weight to NF4 (blocksize 64, double quant, in the compute dtype, as
        transformers does with bnb_4bit_compute_dtype = dtype), or adopt an NF4Weight, or a bitsandbytes
        state dict keyed relative to this module ("weight", "weight.absmax", ..., optional "bias";
        SEMANTICS §3.1). Drops adapters."""
        from adapterhub.runtime import nf4  # lazily: nf4 is only needed by NF4 bases

        if isinstance(w_or_state, torch.Tensor):
            self._move_stacks_off_meta(w_or_state.device)
            q = nf4.quantize(w_or_state.to(device=self.device, dtype=self.dtype), blocksize=NF4_BLOCKSIZE, double_quant=True)
        elif isinstance(w_or_state, nf4.NF4Weight):
            q = w_or_state
        else:
            self._move_stacks_off_meta(w_or_state["weight"].device)
            q = nf4.NF4Weight.from_state_dict(w_or_state, prefix="weight")
            if "bias" in w_or_state and self.bias is not None:
                self.bias.data = w_or_state["bias"].to(device=self.device, dtype=self.dtype).contiguous()
        self.set_nf4_weight(q)
        self.clear_adapters()

    def set_dense_weight(self, w: torch.Tensor) -> None:
        """Replace the base weight, keeping the adapter stacks (merge / unmerge)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != (out, in) = ({self.out_features}, {self.in_features})")
        self.nf4 = None
        for name in ("nf4_packed", "nf4_absmax"):
            self._buffers.pop(name, None)
        self.weight = nn.Parameter(w.to(device=self.device, dtype=self.dtype).contiguous(), requires_grad=False)

    def set_nf4_weight(self, q: NF4Weight) -> None:
        """Replace the base weight by an NF4 one, keeping the adapter stacks (merge / unmerge)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight shape {tuple(q.shape)} != (out, in) = ({self.out_features}, {self.in_features})")
        self.nf4, self.weight = q, None
        # The forward reads only these two: packed nibbles and the float32 absmax decoded once here,
        # never per forward (SEMANTICS §2.1 step 5).
        self.register_buffer("nf4_packed", q.packed.reshape(-1).to(self.device).contiguous(), persistent=False)
        self.register_buffer("nf4_absmax", q.absmax_float32().to(self.device, torch.float32).contiguous(), persistent=False)

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
        self._installed: set[int] = set()  # slots holding an adapter that targets this layer
        self._dora_slots: set[int] = set()  # ... of which DoRA
        self._set_stacks(*self._empty_stacks(1, 1, self.device if hasattr(self, "lora_A_stack") else self.weight.device))

    def _move_stacks_off_meta(self, device: torch.device) -> None:
        """A model built on the meta device gets real (empty) stacks when its weights arrive."""
        if self.device.type == "meta" and device.type != "meta":
            self._set_stacks(*self._empty_stacks(1, 1, device))
            if self.bias is not None and self.bias.device.type == "meta":
                self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.dtype, device=device), requires_grad=False)

    def _empty_stacks(self, N: int, R: int, device) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(N, R, self.in_features, dtype=self.dtype, device=device),  # A (N, R, Din)
            torch.zeros(N, R, self.out_features, dtype=self.dtype, device=device),  # B^T (N, R, Dout)
            torch.zeros(N, dtype=torch.float32, device=device),  # scaling (N,)
            torch.ones(N, self.out_features, dtype=torch.float32, device=device),  # dora_scale (N, Dout)
        )

    def _set_stacks(self, A: torch.Tensor, BT: torch.Tensor, scaling: torch.Tensor, dora: torch.Tensor) -> None:
        self.register_buffer("lora_A_stack", A, persistent=False)
        self.register_buffer("lora_BT_stack", BT, persistent=False)
        self.register_buffer("scaling", scaling, persistent=False)
        self.register_buffer("dora_scale", dora, persistent=False)

    @property
    def num_slots(self) -> int:
        return self.lora_A_stack.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A_stack.shape[1]

    def reserve(self, num_slots: int, rank: int) -> None:
        """Grow the stacks to at least num_slots slots and rank R, keeping every slot's values (zero padding).
        Only between forwards: a forward in flight holds references to the old tensors."""
        N, R = max(num_slots, self.num_slots), max(rank, self.rank)
        if (N, R) == (self.num_slots, self.rank):
            return
        n0, r0 = self.num_slots, self.rank
        A, BT, scaling, dora = self._empty_stacks(N, R, self.device)
        A[:n0, :r0], BT[:n0, :r0] = self.lora_A_stack, self.lora_BT_stack
        scaling[:n0], dora[:n0] = self.scaling, self.dora_scale
        self._set_stacks(A, BT, scaling, dora)

    def install(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None) -> None:
        """Write one adapter into `slot` (rows of that slot only). A (R, Din), B (Dout, R), magnitude (Dout,) | None,
        float32. The DoRA scale comes from dequantized_weight() (SEMANTICS §5.2-5.3: for NF4 the dequantized W)."""
        R = A.shape[0]
        self.reserve(slot + 1, R)
        self.lora_A_stack[slot].zero_()
        self.lora_BT_stack[slot].zero_()
        self.lora_A_stack[slot, :R] = A.to(self.device, self.dtype)
        self.lora_BT_stack[slot, :R] = B.T.to(self.device, self.dtype)
        self.scaling[slot] = float(scaling)
        if magnitude is None:
            self.dora_scale[slot] = 1.0
            self._dora_slots.discard(slot)
        else:
            W = self.dequantized_weight()
            self.dora_scale[slot] = lora_math.dora_scale(W, A.to(W.device), B.to(W.device), scaling, magnitude.to(W.device))
            self._dora_slots.add(slot)
        self._installed.add(slot)

    def uninstall(self, slot: int) -> None:
        """Reset `slot` to "no adapter" (zeros, dora_scale 1); ids up to `slot` become valid for this layer."""
        self.reserve(slot + 1, 1)
        self.lora_A_stack[slot].zero_()
        self.lora_BT_stack[slot].zero_()
        self.scaling[slot] = 0.0
        self.dora_scale[slot] = 1.0
        self._installed.discard(slot)
        self._dora_slots.discard(slot)

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, Din) [or (B, Din)], ids (B,) int64 slot per row or None (all rows slot 0) -> (B, T, Dout)."""
        use_adapters = ids is not None and bool(self._installed)
        dora = self.dora_scale if use_adapters and self._dora_slots else None
        # DoRA scales the output before the bias is added (SEMANTICS §5.3); otherwise the GEMM adds it.
        late_bias = self.bias is not None and (dora is not None or self.nf4 is not None)
        if self.nf4 is None:
            y = torch.nn.functional.linear(x, self.weight, None if late_bias else self.bias)  # (B, T, Dout)
        else:
            y = kernels.nf4_linear(x, self.nf4_packed, self.nf4_absmax, self.nf4.blocksize, self.out_features, self.in_features)
        if use_adapters:
            x3 = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, Din)
            h = kernels.lora_shrink(x3, self.lora_A_stack, ids)  # (B, T, R)
            kernels.lora_expand(y.view(y.shape[0], -1, self.out_features), h, self.lora_BT_stack, ids, self.scaling, dora)
        if late_bias:
            y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        kind = "nf4" if self.nf4 is not None else "dense"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, dtype={self.dtype}, slots={self.num_slots}, rank={self.rank}")
