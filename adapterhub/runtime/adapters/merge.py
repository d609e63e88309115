"""Merge one adapter into the base weights (zero added latency) and unmerge it.

Merge follows PEFT (semantics §4.4, §5.4) through adapters/lora_math.py:
- dense base: W' = round(W + s B A) (one rounding), or for DoRA W' = round((m / n) (W + s B A)) with
  n = ||W + s B A||_row on the unmerged W. Unmerge is arithmetic, as in PEFT: exact within rounding.
- quantized base (NF4, FP4): dequantize -> merge -> requantize (`BaseWeight.replaced_by`: same block size
  and double quant). Requantizing is lossy, so the MergeReport gives the error it adds, and unmerge puts
  the original weight back: the original bytes, exactly (kept while merged: 0.5 byte per parameter).
The report states the loss in the adapter's own terms (semantics §4.6): per module the relative error of
the delta the merged weights carry, ||(W' - W) - dW|| / ||dW||, with dW the exact fp32 delta; past
DELTA_WARN it warns and points at `Base.export`, which merges on the dense weights in fp32 and rounds or
quantizes once (runtime/export.py).
While an adapter is merged the pool refuses batches that name adapters (they would apply on top of it)
and new adapters (their DoRA scales would be computed on the merged weights), as PEFT does (§7).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from adapterhub.errors import MergeError
from adapterhub.runtime.adapters import lora_math
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.adapters.pool import AdapterPool
from adapterhub.runtime.quant.weight import BaseWeight


DELTA_WARN = 0.1  # relative delta error past which a merge warns: a tenth of what the adapter does is lost


@dataclass(frozen=True)
class MergeReport:
    """What a merge did. max / mean_abs_error: what requantization added to the weights (0 for a dense base);
    delta_error_max / mean: ||(W' - W) - dW|| / ||dW|| over the modules, the adapter's own loss."""

    name: str
    modules: int
    quantized: bool
    max_abs_error: float
    mean_abs_error: float
    delta_error_max: float = 0.0
    delta_error_mean: float = 0.0

    @property
    def warning(self) -> str | None:
        if self.delta_error_max <= DELTA_WARN:
            return None
        return (f"merging {self.name!r} into the {'quantized' if self.quantized else 'dense'} base kept its weights "
                f"only approximately: the merged delta is off by {self.delta_error_max:.0%} of the adapter's own "
                f"(mean over {self.modules} modules {self.delta_error_mean:.0%}); serve it unmerged, or write a "
                "merged checkpoint with base.export(dir), which merges in fp32 and rounds or quantizes once")


@dataclass
class MergedState:
    """What unmerge needs: per module the original quantized weight, or the DoRA norm for a dense unmerge."""

    name: str
    report: MergeReport
    originals: dict[str, BaseWeight] = field(default_factory=dict)  # module -> the weight before (quantized bases)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (Dout,) fp32 (dense DoRA)
    deltas: dict[str, float] = field(default_factory=dict)  # module -> delta error of the stored weight


def merge_adapter(base_linears: dict[str, AdapterLinear], pool: AdapterPool, name: str) -> MergeReport:
    """Fold adapter `name` (loaded in `pool`) into the base weights of `base_linears`."""
    if pool.merged is not None:
        raise MergeError(f"adapter {pool.merged.name!r} is already merged; call unmerge() before merging {name!r}")
    adapter = pool.adapter(name)
    state = MergedState(name, report=None)  # type: ignore[arg-type]
    max_err, err_sum, count, quantized = 0.0, 0.0, 0, False
    for module, m in adapter.modules().items():
        layer = base_linears[module]
        A, B = torch.from_numpy(m.lora_A), torch.from_numpy(m.lora_B)  # (R, Din), (Dout, R) fp32
        W = layer.dequantized_weight()
        exact, norm = module_merged_f32(W, A, B, m)  # one fp32 merge: stored rounded or requantized, and reported
        if norm is not None:
            state.norms[module] = norm
        _check_finite(exact, W.dtype, name, module)
        merged = exact.to(W.dtype)  # PEFT's unsafe merge: W + dW in fp32, rounded once (semantics §4.4, §5.4)
        is_quantized = layer.weight.is_quantized
        if is_quantized:
            quantized = True
            state.originals[module] = layer.weight
        layer.replace_weight(layer.weight.replaced_by(merged))
        stored = layer.dequantized_weight() if is_quantized else merged
        if is_quantized:
            err = (stored.float() - exact).abs()
            max_err, err_sum, count = max(max_err, float(err.max())), err_sum + float(err.sum()), count + err.numel()
        state.deltas[module] = delta_error(exact, stored, merged_delta_norm(W, exact, A, B, m))
    deltas = list(state.deltas.values())
    state.report = MergeReport(name, len(adapter.modules()), quantized, max_err, err_sum / count if count else 0.0,
                               max(deltas, default=0.0), sum(deltas) / len(deltas) if deltas else 0.0)
    if state.report.warning:
        warnings.warn(state.report.warning, stacklevel=3)
    pool.merged = state
    return state.report


def module_merged_f32(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      m) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Module m merged into W in fp32, not rounded (what an fp32 export writes), and DoRA's norm n (else None)."""
    magnitude = None if m.magnitude is None else torch.from_numpy(m.magnitude)
    return lora_math.merged_f32(W, A, B, m.scaling, magnitude)


def merged_delta_norm(W: torch.Tensor | None, exact: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      m) -> float:
    """||exact - W||_F, the norm of the delta module m adds to W: for LoRA s ||B A|| from the rank-R factors
    (W is not needed: None is fine), for DoRA measured (W required, read in its dtype, promoted exactly)."""
    if m.magnitude is None:
        return lora_math.delta_norm(A, B, m.scaling)
    if W is None:
        raise ValueError("a DoRA module's delta norm needs the weight before the merge")
    return float(torch.linalg.vector_norm(torch.sub(exact, W)))


def delta_error(exact: torch.Tensor, stored: torch.Tensor, delta_norm: float) -> float:
    """||stored - exact|| / ||exact - W|| (= ||(stored - W) - (exact - W)|| / ||exact - W||): how much of the
    adapter's delta the stored weights lost. exact: the fp32 merge before rounding / requantizing, overwritten
    here (call it last); delta_norm: merged_delta_norm. Stored fp32 (the very tensor): 0 without a pass."""
    if stored is exact or delta_norm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(exact.sub_(stored))) / delta_norm


def _check_finite(exact: torch.Tensor, dtype: torch.dtype, name: str, module: str) -> None:
    """MergeError unless every value of the fp32 merge is finite and stays finite rounded to dtype
    (one read: aminmax is NaN when any value is, and names the range otherwise)."""
    low, high = (float(v) for v in torch.aminmax(exact))
    limit = torch.finfo(dtype).max
    if not (-limit <= low and high <= limit):  # False for NaN too
        raise MergeError(f"merging {name!r} into {module!r} gives non-finite weights (range {low:g} .. {high:g}, "
                         f"{torch.finfo(dtype).dtype} holds ±{limit:g}); the adapter is broken")


def unmerge(base_linears: dict[str, AdapterLinear], pool: AdapterPool) -> str:
    """Undo merge_adapter; returns the adapter's name. Quantized layers get their original bytes back."""
    state = pool.merged
    if state is None:
        raise MergeError("no adapter is merged; nothing to unmerge")
    for module, m in pool.adapter(state.name).modules().items():
        layer = base_linears[module]
        if module in state.originals:
            layer.replace_weight(state.originals[module])
            continue
        A, B, W = torch.from_numpy(m.lora_A), torch.from_numpy(m.lora_B), layer.dequantized_weight()
        if m.magnitude is None:
            W = lora_math.unmerge_lora(W, A, B, m.scaling)
        else:
            W = lora_math.unmerge_dora(W, A, B, m.scaling, torch.from_numpy(m.magnitude), state.norms[module])
        layer.replace_weight(layer.weight.replaced_by(W))
    pool.merged = None
    return state.name
