"""Combine weighted adapters into a new one, with PEFT's add_weighted_adapter semantics (semantics §4, §5.5).

The result is a PEFT-format `Adapter` (adapters/lora_math.py's combine_* do the math): it can be saved,
pushed to a registry or loaded like any other.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from adapterhub.adapter import PEFT_DEFAULTS, Adapter, peft_key
from adapterhub.errors import MergeError
from adapterhub.runtime.adapters import lora_math

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
