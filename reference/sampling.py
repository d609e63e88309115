"""Which tokens sampling may pick, and with what probability: penalties, then temperature, top-k, top-p;
and the log-probabilities a server reports.

The order and conventions of Hugging Face generate's logits warpers (and vLLM's sampler):
- temperature 0 means greedy: all mass on the argmax, ties to the lowest token id;
- top_k = 0 disables top-k; otherwise every token whose logit is >= the k-th largest survives (ties kept);
- top_p = 1 disables top-p; otherwise, going down the surviving tokens by probability (ties: lower id
  first), a token survives while the mass before it is < top_p: the smallest set whose mass reaches
  top_p, and never empty;
- the survivors' probabilities are renormalised. Computed in float64.

Penalties change the logits before any of that (vLLM's order: repetition, then frequency, then presence),
and greedy decoding too picks the argmax of the penalised logits:
- OpenAI's frequency and presence penalties, over the tokens generated so far (not the prompt), with c[j]
  the number of times token j was generated: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty;
- the repetition penalty r of the CTRL paper as transformers and vLLM apply it, over every token of the
  prompt and of the output: a seen token's logit becomes logit / r when positive, logit * r otherwise.

Log-probabilities (OpenAI's `logprobs`) are those of the model's raw logits, log_softmax(logits), before
penalties and temperature (vLLM's default, "raw_logprobs"); the top ones are ordered by log-probability,
ties by lower token id.
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


def apply_penalties(logits, output_counts, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                    prompt_tokens=()):
    """One row's penalised logits.  # (V,), (V,) counts of each generated token -> (V,) float64"""
    z = np.array(logits, np.float64)
    counts = np.asarray(output_counts, np.float64)
    seen = counts > 0
    seen[list(prompt_tokens)] = True
    z = np.where(seen, np.where(z > 0, z / repetition_penalty, z * repetition_penalty), z)
    return z - counts * frequency_penalty - (counts > 0) * presence_penalty


def log_probabilities(logits):
    """log_softmax in float64.  # (V,) -> (V,)"""
    z = np.asarray(logits, np.float64)
    shifted = z - z.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_log_probabilities(logits, k):
    """The k most likely tokens and their log-probabilities, most likely first, ties by lower id.
    # (V,) -> [(token id, logprob)] * k"""
    lp = log_probabilities(logits)
    order = np.lexsort((np.arange(lp.shape[0]), -lp))[:k]
    return [(int(i), float(lp[i])) for i in order]
