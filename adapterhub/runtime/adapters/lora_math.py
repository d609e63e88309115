"""LoRA / rsLoRA / DoRA math in torch, matching PEFT 0.21.2 and `reference/lora.py` (docs/semantics.md §4, §5).

Shapes: A (R, Din) = lora_A, B (Dout, R) = lora_B, W (Dout, Din), magnitude (Dout,).

Dtype policy (one rule, so every caller gets the numbers PEFT gets on CPU):
- B @ A is always computed in float32 (PEFT upcasts half adapters on CPU, §4.4); `delta_weight`
  returns it in A's dtype, as PEFT's `get_delta_weight` does.
- DoRA norms and scales are float32, computed from the given W upcast to float32. That is what a
  PEFT forward with fp32 adapters does (W is cast to x's dtype, which is lora_A's, §5.3); for an NF4
  base, W is the dequantized weight in the compute dtype (§5.2).
- Merges return a new tensor in W's dtype; the in-between sum is float32 (one rounding) unless
  `safe=True`, which rounds dW to W's dtype first (two roundings), exactly like PEFT (§4.4).

Combining adapters follows PEFT's `add_weighted_adapter`: "linear", "ties", "dare_*" and
"magnitude_prune" act on the A and B factors separately, each weighted by sqrt(|w * s|) (the sign
goes on A), "cat" stacks ranks, and the "*svd" methods combine full delta weights and re-factor them
by truncated SVD. The combined adapter's own scaling is 1 (PEFT sets lora_alpha = r).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from adapterhub.errors import MergeError

# --- LoRA and DoRA ------------------------------------------------------------------------------


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Semantics: (B.float() @ A.float() * scaling).to(A.dtype), transposed if fan_in_fan_out.

    A (R, Din), B (Dout, R) -> (Dout, Din), or (Din, Dout) with fan_in_fan_out (Conv1D layout).
    """
    delta = (B.float() @ A.float()) * scaling
    return (delta.T if fan_in_fan_out else delta).to(A.dtype)


def delta_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """||scaling * B @ A||_F without forming B @ A: ||BA||_F^2 = sum((B^T B) * (A A^T)), R x R Gram matrices in
    float64 (both symmetric, so the trace of their product is the sum of their elementwise product).

    A (R, Din), B (Dout, R) -> a float; equals torch.linalg.norm(delta_weight(A, B, s)) within fp32 rounding.
    """
    gram_b, gram_a = B.double().T @ B.double(), A.double() @ A.double().T  # (R, R), (R, R)
    return abs(scaling) * float((gram_b * gram_a).sum().clamp_min(0).sqrt())


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Semantics: torch.linalg.norm(W.float() + scaling * B.float() @ A.float(), dim=1); no epsilon (§5.2).

    W (Dout, Din), A (R, Din), B (Dout, R) -> (Dout,) float32.
    """
    return torch.linalg.vector_norm(W.float() + delta_weight(A.float(), B, scaling), dim=1)


def dora_scale(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """Semantics: magnitude.float() / dora_weight_norm(W, A, B, scaling)  (DoRA paper, Sec. 4.3; semantics §5.3).

    The per-output factor g of y = b + g * (W x + s B A x); it does not depend on x, so the runtime
    computes it once per adapter. -> (Dout,) float32
    """
    return magnitude.float() / dora_weight_norm(W, A, B, scaling)


def _checked(W: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise MergeError(
            f"merging {what} gives {bad} non-finite weights (NaN/inf) of {W.numel()}; "
            "the adapter is broken (check its lora_A / lora_B / magnitude for NaN or huge values)"
        )
    return W


def merged_f32(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merge before rounding, in fp32: LoRA V = W.float() + dW; DoRA (magnitude given) (m / n)[:, None] * V
    with n = ||V||_row (§4.4, §5.4). -> (W' (Dout, Din) float32, n (Dout,) float32 or None)

    Bit for bit what merge_lora / merge_dora compute before their final rounding, formed in one new
    (Dout, Din) buffer: IEEE addition and multiplication commute, so dW + W.float() = W.float() + dW, and an
    in-place add of a bf16 / fp16 W promotes it exactly. W is only read (it may be a layer's own weight).
    """
    V = (B.float() @ A.float()).mul_(scaling).add_(W)  # dW = (B A) s (delta_weight), then + W
    if magnitude is None:
        return V, None
    norm = torch.linalg.vector_norm(V, dim=1)  # (Dout,)
    return V.mul_((magnitude.float() / norm)[:, None]), norm


def merge_lora(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, safe: bool = False
) -> torch.Tensor:
    """Semantics: (W.float() + delta_weight(A, B, s)).to(W.dtype); safe: W + delta.to(W.dtype), checked finite.

    The two differ for ~30% of bf16 elements (§4.4). W (Dout, Din) -> new (Dout, Din) in W's dtype.
    """
    if not safe:
        return merged_f32(W, A, B, scaling)[0].to(W.dtype)
    return _checked(W + delta_weight(A.float(), B, scaling).to(W.dtype), "a LoRA adapter")


def unmerge_lora(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Semantics: W - delta_weight(A, B, s).to(W.dtype)  (§4.4). -> (Dout, Din) in W's dtype"""
    return W - delta_weight(A.float(), B, scaling).to(W.dtype)


def merge_dora(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor, safe: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: V = W.float() + dW; n = ||V||_row; W' = ((magnitude / n)[:, None] * V).to(W.dtype)  (§5.4).

    n is taken on the unmerged W and must be kept to unmerge. -> (W' (Dout, Din), n (Dout,) float32)
    """
    merged, norm = merged_f32(W, A, B, scaling, magnitude)
    merged = merged.to(W.dtype)
    return (_checked(merged, "a DoRA adapter") if safe else merged), norm


def unmerge_dora(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Semantics: (W.float() / (magnitude / norm)[:, None] - dW).to(W.dtype), norm from merge_dora (§5.4)."""
    factor = magnitude.float() / norm.float()  # (Dout,)
    return (W.float() / factor[:, None] - delta_weight(A.float(), B, scaling)).to(W.dtype)


# --- combining task tensors (PEFT merge_utils semantics; TIES: Yadav et al. 2023, DARE: Yu et al. 2023)


def _stack_weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)  # (K,)
    return torch.stack(tensors) * w.view(-1, *[1] * tensors[0].dim())  # (K, ...)


def _magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest |t| (PEFT rounds down); density >= 1 keeps all."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _random_drop(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each element with probability density, rescale kept ones by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _disjoint_mean(pruned: torch.Tensor, weighted: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES elect + disjoint merge: the sign is elected on the *unweighted* pruned tensors, as PEFT does;
    the mean runs over the entries that agree with it (zeros never agree)."""
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    votes = pruned.sum(0) if majority_sign_method == "total" else pruned.sign().sum(0)
    agree = pruned.sign() == torch.where(votes >= 0, 1.0, -1.0).to(pruned.dtype)  # (K, ...)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _check_density(density: float | None) -> float:
    if density is None or not density >= 0:
        raise MergeError(f"density must be a number in [0, 1] for ties / dare / magnitude_prune, got {density!r}")
    return density


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Semantics: sum_k weights[k] * tensors[k]."""
    return _stack_weighted(tensors, weights).sum(0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Semantics: sum_k weights[k] * top_|.|(tensors[k], density)."""
    d = _check_density(density)
    return task_arithmetic([_magnitude_mask(t, d) for t in tensors], weights)


def ties(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float, majority_sign_method: str = "total"
) -> torch.Tensor:
    """Semantics: trim each tensor to its top-density magnitudes, elect a sign per entry, weighted disjoint mean."""
    d = _check_density(density)
    pruned = torch.stack([_magnitude_mask(t, d) for t in tensors])  # (K, ...)
    return _disjoint_mean(pruned, _stack_weighted(list(pruned), weights), majority_sign_method)


def dare(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    *,
    use_ties: bool = False,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Semantics: drop each entry with prob 1-density, rescale by 1/density, then a weighted sum
    (dare_linear) or TIES' sign election + disjoint mean (dare_ties). Draws one bernoulli tensor per
    input, in order, from `generator`: PEFT draws the same way from the global generator, so the same
    generator state gives PEFT's masks (PEFT initialises the new adapter first, which also draws)."""
    d = _check_density(density)
    dropped = torch.stack([_random_drop(t, d, generator) for t in tensors])  # (K, ...)
    if not use_ties:
        return task_arithmetic(list(dropped), weights)
    return _disjoint_mean(dropped, _stack_weighted(list(dropped), weights), majority_sign_method)


def _method(name: str, density, majority_sign_method, generator):
    table = {
        "linear": lambda ts, ws: task_arithmetic(ts, ws),
        "ties": lambda ts, ws: ties(ts, ws, density, majority_sign_method),
        "dare_linear": lambda ts, ws: dare(ts, ws, density, generator=generator),
        "dare_ties": lambda ts, ws: dare(
            ts, ws, density, use_ties=True, majority_sign_method=majority_sign_method, generator=generator
        ),
        "magnitude_prune": lambda ts, ws: magnitude_prune(ts, ws, density),
    }
    if name not in table:
        raise MergeError(f"unknown combination method {name!r}; choose one of {sorted(table)} (or 'cat', 'svd')")
    return table[name]


def combine_factors(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    method: str = "linear",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT add_weighted_adapter with linear / ties / dare_linear / dare_ties / magnitude_prune.

    Semantics: c_k = sqrt(|w_k s_k|); A = method([A_k], [sign(w_k s_k) c_k]), B = method([B_k], [c_k]).
    Same rank R for every adapter. -> (A (R, Din), B (Dout, R)) in A_0's dtype; the result's scaling is 1.
    """
    ws = [w * s for w, s in zip(weights, scalings)]
    wa = [math.copysign(math.sqrt(abs(w)), 1.0 if w >= 0 else -1.0) for w in ws]
    wb = [math.sqrt(abs(w)) for w in ws]
    combine = _method(method, density, majority_sign_method, generator)
    A, B = combine([a.float() for a in As], wa), combine([b.float() for b in Bs], wb)
    return A.to(As[0].dtype), B.to(As[0].dtype)


def combine_linear(As, Bs, scalings, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT combination_type="linear" (see combine_factors); only approximates sum_k w_k dW_k."""
    return combine_factors(As, Bs, scalings, weights, "linear")


def combine_cat(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scalings: Sequence[float], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: A = cat([w_k s_k A_k], 0), B = cat([B_k], 1), so B @ A = sum_k w_k dW_k exactly.

    -> (A (sum R_k, Din), B (Dout, sum R_k)); the result's scaling is 1.
    """
    return torch.cat([a * (w * s) for a, w, s in zip(As, weights, scalings)]), torch.cat(list(Bs), dim=1)


def svd_to_lora(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: U, S, Vh = svd(delta); B = U[:, :r] * S[:r], A = Vh[:r]  (best rank-r approximation).

    delta (Dout, Din) -> (A (r, Din), B (Dout, r)) in float32.
    """
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return Vh[:r].contiguous(), (U[:, :r] * S[:r]).contiguous()


def combine_svd(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    r: int,
    method: str = "linear",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT "svd" / "ties_svd" / "dare_linear_svd" / "dare_ties_svd" / "magnitude_prune_svd":
    Semantics: svd_to_lora(method([delta_weight(A_k, B_k, s_k)], weights), r)."""
    deltas = [delta_weight(a.float(), b, s) for a, b, s in zip(As, Bs, scalings)]
    return svd_to_lora(_method(method, density, majority_sign_method, generator)(deltas, list(weights)), r)
