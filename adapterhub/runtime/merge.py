"""Merge one adapter into the base weights (zero added latency), unmerge it, and combine adapters.

Merge follows PEFT (SEMANTICS §4.4, §5.4) through runtime/lora_math.py:
- dense base: W' = round(W + s B A) (one rounding), or for DoRA W' = round((m / n) (W + s B A)) with
  n = ||W + s B A||_row on the unmerged W. Unmerge is arithmetic, as in PEFT: exact within rounding.
- NF4 base: dequantize -> merge -> requantize (same blocksize and double quant). Requantizing is lossy,
  so the MergeReport gives the error it adds, and unmerge puts the original NF4 weight back: the
  original bytes, exactly (it is kept while merged, costing 0.5 byte per targeted parameter).
While an adapter is merged the pool refuses batches that name adapters (they would apply on top of it)
and new adapters (their DoRA scales would be computed on the merged weights), as PEFT does (§7).

combine(...) builds a new PEFT-format adapter from weighted adapters with PEFT's add_weighted_adapter
semantics (lora_math.combine_*): it can be saved, pushed to a registry or loaded like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from adapterhub.adapter import PEFT_DEFAULTS, Adapter, peft_key
from adapterhub.errors import MergeError
from adapterhub.runtime import lora_math
from adapterhub.runtime.linear import AdapterLinear
from adapterhub.runtime.pool import AdapterPool


@dataclass(frozen=True)
class MergeReport:
    """What a merge did; the errors are those requantization added (0 for a dense base)."""

    name: str
    modules: int
    quantized: bool
    max_abs_error: float
    mean_abs_error: float


@dataclass
class MergedState:
    """What unmerge needs: per module the original NF4 weight, or the DoRA norm for a dense unmerge."""

    name: str
    report: MergeReport
    originals: dict[str, object] = field(default_factory=dict)  # module -> NF4Weight (NF4 bases)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (Dout,) fp32 (dense DoRA)


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
        if m.magnitude is None:
            merged = lora_math.merge_lora(W, A, B, m.scaling)
        else:
            merged, state.norms[module] = lora_math.merge_dora(W, A, B, m.scaling, torch.from_numpy(m.magnitude))
        if not torch.isfinite(merged).all():
            raise MergeError(f"merging {name!r} into {module!r} gives non-finite weights; the adapter is broken")
        if layer.is_nf4:
            quantized = True
            state.originals[module] = layer.nf4
            layer.set_nf4_weight(_requantize(merged, layer.nf4))
            err = (layer.dequantized_weight().float() - merged.float()).abs()
            max_err, err_sum, count = max(max_err, float(err.max())), err_sum + float(err.sum()), count + err.numel()
        else:
            layer.set_dense_weight(merged)
    state.report = MergeReport(name, len(adapter.modules()), quantized, max_err, err_sum / count if count else 0.0)
    pool.merged = state
    return state.report


def unmerge(base_linears: dict[str, AdapterLinear], pool: AdapterPool) -> str:
    """Undo merge_adapter; returns the adapter's name. NF4 layers get their original bytes back."""
    state = pool.merged
    if state is None:
        raise MergeError("no adapter is merged; nothing to unmerge")
    for module, m in pool.adapter(state.name).modules().items():
        layer = base_linears[module]
        if module in state.originals:
            layer.set_nf4_weight(state.originals[module])
            continue
        A, B = torch.from_numpy(m.lora_A), torch.from_numpy(m.lora_B)
        if m.magnitude is None:
            layer.set_dense_weight(lora_math.unmerge_lora(layer.weight, A, B, m.scaling))
        else:
            magnitude = torch.from_numpy(m.magnitude)
            layer.set_dense_weight(lora_math.unmerge_dora(layer.weight, A, B, m.scaling, magnitude, state.norms[module]))
    pool.merged = None
    return state.name


def _requantize(W: torch.Tensor, like):
    """Quantize W with the blocksize and double-quant setting of the NF4 weight it replaces (§4.4)."""
    from adapterhub.runtime import nf4

    return nf4.quantize(W, blocksize=like.blocksize, double_quant=like.double_quant)


# --- combine ------------------------------------------------------------------------------------

_FACTOR_METHODS = {"linear": "linear", "ties": "ties", "dare": "dare_linear", "dare_ties": "dare_ties",
                   "magnitude_prune": "magnitude_prune"}


def combine(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    method: str = "linear",
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int | None = None,
    majority_sign_method: str = "total",
) -> Adapter:
    """A new LoRA adapter combining `adapters` with `weights`, as PEFT's add_weighted_adapter does.

    method: "linear" | "ties" | "dare" (dare_linear) | "dare_ties" | "magnitude_prune": on the A and B
    factors (same rank needed); "cat": ranks stacked, exactly sum_k w_k dW_k. With `rank`, the methods
    act on full delta weights and the result is refactored by truncated SVD to that rank (PEFT "svd",
    "ties_svd", "dare_linear_svd", ...). density: for ties / dare / magnitude_prune; seed: dare's draws.
    Modules an adapter does not target count as zero for it. The result's scaling is 1 (alpha = r).
    """
    _check_combine(adapters, weights, method, rank)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tensors, ranks = {}, {}
    modules = sorted({m for a in adapters for m in a.modules()})
    for module in modules:
        parts = [(a.modules()[module], w) for a, w in zip(adapters, weights) if module in a.modules()]
        As = [torch.from_numpy(p.lora_A) for p, _ in parts]
        Bs = [torch.from_numpy(p.lora_B) for p, _ in parts]
        scalings, ws = [p.scaling for p, _ in parts], [w for _, w in parts]
        if method == "cat":
            A, B = lora_math.combine_cat(As, Bs, scalings, ws)
        elif rank is not None:
            A, B = lora_math.combine_svd(As, Bs, scalings, ws, rank, _FACTOR_METHODS[method], density=density,
                                         majority_sign_method=majority_sign_method, generator=generator)
        else:
            if len({a.shape[0] for a in As}) > 1:
                raise MergeError(f"combine method {method!r} needs one rank, but module {module!r} has ranks "
                                 f"{[a.shape[0] for a in As]}; use method='cat' or pass rank= (SVD)")
            A, B = lora_math.combine_factors(As, Bs, scalings, ws, _FACTOR_METHODS[method], density=density,
                                             majority_sign_method=majority_sign_method, generator=generator)
        tensors[peft_key(module, "lora_A")] = A.float().contiguous().numpy()
        tensors[peft_key(module, "lora_B")] = B.float().contiguous().numpy()
        ranks[module] = A.shape[0]
    return Adapter(_combined_config(adapters[0], ranks), tensors)


def _check_combine(adapters, weights, method, rank) -> None:
    if not adapters or len(adapters) != len(weights):
        raise MergeError(f"combine needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    if method != "cat" and method not in _FACTOR_METHODS:
        raise MergeError(f"unknown combine method {method!r}; choose one of {['cat', *_FACTOR_METHODS]}")
    if method == "cat" and rank is not None:
        raise MergeError("method='cat' keeps every rank (exact); rank= only applies to the other methods")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be a positive integer, got {rank!r}")
    dora = [i for i, a in enumerate(adapters) if a.config.use_dora]
    if dora:
        raise MergeError(f"adapters {dora} are DoRA; combining needs plain LoRA adapters (the DoRA magnitude "
                         "does not combine linearly; PEFT's add_weighted_adapter does not support it either)")


def _combined_config(first: Adapter, ranks: dict[str, int]) -> dict:
    """PEFT config of the result: every module listed by full name, alpha = r so the scaling is 1."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is the default
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    base = first.config.to_dict()
    return {**PEFT_DEFAULTS, "r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern,
            "alpha_pattern": dict(pattern), "base_model_name_or_path": base.get("base_model_name_or_path"),
            "task_type": base.get("task_type")}
