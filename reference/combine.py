"""Combining LoRA adapters as PEFT 0.21.2's `add_weighted_adapter` does, in NumPy (float32).

Task tensors t_k (any shape, all alike) with weights w_k:
- linear:          sum_k w_k t_k
- magnitude_prune: keep the int(density * numel) largest |t_k| of each, then linear
- ties:            magnitude-trim each, elect a sign per entry from the *unweighted* trimmed tensors
                   ("total": sign of their sum, >= 0 -> +; "frequency": sign of the sum of signs), then the
                   mean of the weighted entries agreeing with it (TIES-Merging, Yadav et al. 2023, Sec. 3)
- dare:            keep each entry with probability density, rescale by 1/density (DARE, Yu et al. 2023),
                   then linear (dare_linear) or the TIES election + mean (dare_ties). The reference takes the
                   keep-masks as input: the random draw is torch's (see runtime/lora_math.dare).
density >= 1 means no pruning. For LoRA factors, PEFT combines A and B separately with weights
sqrt(|w s|) (sign on A); "cat" stacks ranks; "svd" methods combine the delta weights and refactor them.
The combined adapter's scaling is 1 (PEFT sets lora_alpha = r).
"""

import numpy as np


def _weighted(tensors, weights):
    t = np.stack([np.asarray(x, np.float32) for x in tensors])  # (K, ...)
    return t * np.asarray(weights, np.float32).reshape((-1,) + (1,) * (t.ndim - 1))


def task_arithmetic(tensors, weights):
    return _weighted(tensors, weights).sum(axis=0)


def magnitude_trim(t, density):
    """Zero all but the int(density * numel) largest |t|."""
    t = np.asarray(t, np.float32)
    if density >= 1:
        return t
    k = int(density * t.size)
    keep = np.zeros(t.size, np.float32)
    keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = 1
    return t * keep.reshape(t.shape)


def disjoint_mean(trimmed, weights, majority_sign_method="total"):
    trimmed = np.stack(trimmed)  # (K, ...)
    votes = trimmed.sum(axis=0) if majority_sign_method == "total" else np.sign(trimmed).sum(axis=0)
    agree = np.sign(trimmed) == np.where(votes >= 0, 1.0, -1.0)  # (K, ...); zeros never agree
    return (_weighted(trimmed, weights) * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def magnitude_prune(tensors, weights, density):
    return task_arithmetic([magnitude_trim(t, density) for t in tensors], weights)


def ties(tensors, weights, density, majority_sign_method="total"):
    return disjoint_mean([magnitude_trim(t, density) for t in tensors], weights, majority_sign_method)


def dare(tensors, weights, density, keep_masks, use_ties=False, majority_sign_method="total"):
    """keep_masks[k]: 0/1 array shaped like tensors[k] (ignored when density >= 1)."""
    if density >= 1:
        dropped = [np.asarray(t, np.float32) for t in tensors]
    else:
        dropped = [np.asarray(t, np.float32) * m / np.float32(density) for t, m in zip(tensors, keep_masks)]
    if use_ties:
        return disjoint_mean(dropped, weights, majority_sign_method)
    return task_arithmetic(dropped, weights)


def combine_factors(
    As, Bs, scalings, weights, method="linear", density=None, majority_sign_method="total", keep_masks=None
):
    """linear / ties / dare_linear / dare_ties / magnitude_prune on the factors.  -> (A (R, Din), B (Dout, R))

    keep_masks (dare only): (masks for the A_k, masks for the B_k).
    """
    ws = [w * s for w, s in zip(weights, scalings)]
    wa = [np.sqrt(abs(w)) * (1.0 if w >= 0 else -1.0) for w in ws]
    wb = [np.sqrt(abs(w)) for w in ws]
    masks = keep_masks or (None, None)
    combine = {
        "linear": lambda ts, w, m: task_arithmetic(ts, w),
        "magnitude_prune": lambda ts, w, m: magnitude_prune(ts, w, density),
        "ties": lambda ts, w, m: ties(ts, w, density, majority_sign_method),
        "dare_linear": lambda ts, w, m: dare(ts, w, density, m),
        "dare_ties": lambda ts, w, m: dare(ts, w, density, m, True, majority_sign_method),
    }[method]
    return combine(As, wa, masks[0]), combine(Bs, wb, masks[1])


def combine_cat(As, Bs, scalings, weights):
    """A = concat(w_k s_k A_k), B = concat(B_k), so B A = sum_k w_k s_k B_k A_k.

    -> (A (sum R, Din), B (Dout, sum R))
    """
    A = np.concatenate([np.asarray(a, np.float32) * np.float32(w * s) for a, w, s in zip(As, weights, scalings)])
    return A, np.concatenate([np.asarray(b, np.float32) for b in Bs], axis=1)


def svd_to_lora(delta, r):
    """Best rank-r factors of delta (Eckart-Young): B = U_r S_r, A = Vh_r.  # (Dout, Din) -> (r, Din), (Dout, r)"""
    U, S, Vh = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    return Vh[:r].astype(np.float32), (U[:, :r] * S[:r]).astype(np.float32)
