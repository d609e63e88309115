"""What a step does to the logits besides sampling: the penalties, and the log-probabilities a request asked
for. reference/sampling.py is the spec of both (`apply_penalties`, `top_log_probabilities`). Engine thread only.

Penalties need, per cache row, how often each token was generated and which tokens the prompt holds: two
(max_batch, V) tables, allocated when a first request with a penalty arrives and indexed by cache row, so
that rows joining and leaving the batch never move them. A row's entries are reset when it is admitted;
the counts are updated only while some running row has a penalty, which is enough, since only such a row
reads its own entries.
"""

from __future__ import annotations

from typing import Sequence

import torch

from adapterhub.serve.requests import SamplingParams, TokenLogprob


class Penalties:
    def __init__(self, max_batch: int, vocab_size: int):
        self.max_batch, self.vocab_size = max_batch, vocab_size
        self._counts: torch.Tensor | None = None  # (Bmax, V) int32: times each token was generated
        self._in_prompt: torch.Tensor | None = None  # (Bmax, V) bool

    def start(self, index: int, prompt: Sequence[int], params: SamplingParams, device,
              generated: Sequence[int] = ()) -> None:
        """A row is admitted into cache row `index`; `generated`: the tokens it sampled before (a preempted row
        resumed in another cache row counts them again, so it samples what it would have)."""
        if not params.has_penalties:
            return
        if self._counts is None:
            self._counts = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=device)
            self._in_prompt = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=device)
        self._counts[index] = 0
        self._in_prompt[index] = False
        self._in_prompt[index, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        if generated:
            tokens = torch.as_tensor(list(generated), dtype=torch.long, device=device)
            self._counts[index].index_put_((tokens,), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The penalised logits (float32) of the rows with a penalty; the input itself when none has one.
        # (B, V), rows (B,) cache rows -> (B, V)"""
        if not any(p.has_penalties for p in params):
            return logits
        rows = rows.to(self._counts.device)
        column = lambda values: torch.tensor(values, dtype=torch.float32, device=logits.device)[:, None]  # noqa: E731
        presence = column([p.presence_penalty for p in params])  # (B, 1)
        frequency = column([p.frequency_penalty for p in params])
        repetition = column([p.repetition_penalty for p in params])
        counts = self._counts[rows].float()  # (B, V)
        seen = (counts > 0) | self._in_prompt[rows]
        z = logits.float()
        z = torch.where(seen, torch.where(z > 0, z / repetition, z * repetition), z)
        return z - counts * frequency - (counts > 0).float() * presence

    def record(self, rows: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> None:
        """Counts the tokens just sampled.  # rows (B,), tokens (B,)"""
        if self._counts is None or not any(p.has_penalties for p in params):
            return
        rows, tokens = rows.to(self._counts.device), tokens.to(self._counts.device)
        self._counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32), accumulate=True)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   params: Sequence[SamplingParams]) -> list[TokenLogprob | None]:
    """Each row's sampled token with its log-probability under the raw logits and the `logprobs` most likely
    tokens (ties: lower id first); None for rows that did not ask.  # (B, V), (B,) -> B entries"""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(params)
    if not wanted:
        return out
    sampled = tokens.tolist()
    index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits[index].float(), dim=-1)  # (b, V)
    chosen = lp.gather(1, tokens.to(logits.device)[index][:, None])[:, 0].tolist()
    k = max(params[i].logprobs for i in wanted)
    top = _top_k_lower_id_first(lp, k) if k else [[] for _ in wanted]
    for j, i in enumerate(wanted):
        out[i] = TokenLogprob(sampled[i], chosen[j], tuple(top[j][: params[i].logprobs]))
    return out


def _top_k_lower_id_first(lp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k largest entries as (id, value), ties in the lower id first, without sorting the vocabulary:
    topk finds the k-th value, then only the entries at or above it (k, or a few more on ties) are sorted.
    # (b, V) -> b lists of k pairs"""
    threshold = lp.topk(k, dim=-1).values[:, -1:]  # (b, 1)
    rows = []
    for row, t in zip(lp, threshold):
        ids = (row >= t).nonzero()[:, 0]  # ascending ids: a stable sort keeps ties in id order
        values, order = row[ids].sort(descending=True, stable=True)
        rows.append(list(zip(ids[order][:k].tolist(), values[:k].tolist())))
    return rows
