"""Which tokens sampling may pick, and with what probability: temperature, then top-k, then top-p.

The order and conventions of Hugging Face generate's logits warpers (and vLLM's sampler):
- temperature 0 means greedy: all mass on the argmax, ties to the lowest token id;
- top_k = 0 disables top-k; otherwise every token whose logit is >= the k-th largest survives (ties kept);
- top_p = 1 disables top-p; otherwise, going down the surviving tokens by probability (ties: lower id
  first), a token survives while the mass before it is < top_p: the smallest set whose mass reaches
  top_p, and never empty;
- the survivors' probabilities are renormalised. Computed in float64.
"""

import numpy as np


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def row_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """One row.  # (V,) -> (V,) float64, summing to 1"""
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        return np.eye(logits.shape[0])[np.argmax(logits)]  # argmax returns the first (lowest) maximum
    z = logits / temperature
    if 0 < top_k < z.shape[0]:
        kth = np.sort(z)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = softmax(z)
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")  # descending, ties by lower id
        mass_before = np.cumsum(p[order]) - p[order]
        keep = np.zeros(p.shape, bool)
        keep[order] = mass_before < top_p
        keep[order[0]] = True
        p = np.where(keep, p, 0.0)
    return p / p.sum()


def probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Each row's sampling distribution; parameters are scalars or per-row sequences.  # (B, V) -> (B, V)"""
    logits = np.asarray(logits, np.float64)
    t, k, p, _ = np.broadcast_arrays(
        np.asarray(temperature, np.float64), np.asarray(top_k, np.int64), np.asarray(top_p, np.float64), logits[:, 0]
    )  # (B,) each
    return np.stack([row_probabilities(logits[b], t[b], k[b], p[b]) for b in range(logits.shape[0])])
