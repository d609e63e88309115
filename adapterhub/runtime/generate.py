"""Sampling, the step API (`prefill` / `decode`) shared with the serving engine, and `generate`.

Sampling follows reference/sampling.py: temperature, then top-k (ties kept), then top-p (smallest
prefix by probability reaching top_p, never empty); temperature 0 is greedy. Every row has its own
parameters and seed. Random numbers are counter-based: row b's token number i uses a hash of
(seed_b, i, token id), so a row's samples do not depend on the other rows of its batch (a served
completion equals `generate` for the same seed) and nothing is read back from the device. The draw
is gpt-fast's exponential trick: argmax(p / E) with E ~ Exp(1) samples from p without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from adapterhub.errors import RequestError
from adapterhub.runtime.model.kv_cache import BLOCK_SIZE, KVCache
from adapterhub.runtime.model.model import Transformer

_M32 = 0xFFFFFFFF
STOP_CHECK_EVERY = 8  # decode steps between host reads of the `done` flags (stopping needs a sync)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters, all (B,); `offset` counts tokens sampled so far and `sample` advances it."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32; 1 = off
    seed: torch.Tensor  # int64 in [0, 2^32)
    offset: torch.Tensor  # int64
    is_greedy: bool  # every row greedy: argmax only
    has_filter: bool  # some row uses top-k or top-p

    @classmethod
    def from_params(cls, temperature: Sequence[float], top_k: Sequence[int] | None = None,
                    top_p: Sequence[float] | None = None, seed: Sequence[int | None] | None = None,
                    offset: Sequence[int] | None = None, device="cpu") -> SamplingBatch:
        B = len(temperature)
        top_k = [0] * B if top_k is None else [int(k or 0) for k in top_k]
        top_p = [1.0] * B if top_p is None else [1.0 if p is None else float(p) for p in top_p]
        for t, k, p in zip(temperature, top_k, top_p):
            if not (t >= 0 and k >= 0 and 0 < p <= 1):
                raise RequestError(f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {t}, {k}, {p}")
        seeds = [None] * B if seed is None else list(seed)
        # Rows without a seed draw one from torch's global generator (host side, once per batch).
        seeds = [int(torch.randint(0, 2**32, ())) if s is None else int(s) & _M32 for s in seeds]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        return cls(
            temperature=as_tensor([float(t) for t in temperature], torch.float32),
            top_k=as_tensor(top_k, torch.int64), top_p=as_tensor(top_p, torch.float32),
            seed=as_tensor(seeds, torch.int64),
            offset=as_tensor([0] * B if offset is None else list(offset), torch.int64),
            is_greedy=all(t == 0 for t in temperature),
            has_filter=any(k > 0 for k in top_k) or any(p < 1 for p in top_p),
        )


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Next token per row.  # (B, V) -> (B,) int64, on the logits' device, no host sync"""
    if params.seed.device != logits.device:
        raise ValueError(f"SamplingBatch is on {params.seed.device} but the logits are on {logits.device}; "
                         "build it with SamplingBatch.from_params(..., device=base.model.device)")
    logits = logits.float()
    greedy = logits.argmax(-1)  # ties: the lowest id, as the reference
    if params.is_greedy:
        params.offset.add_(1)
        return greedy
    z = logits / params.temperature.clamp(min=1e-6)[:, None]  # (B, V)
    if params.has_filter:
        z = _filter(z, params.top_k, params.top_p)
    probs = torch.softmax(z, dim=-1)
    noise = -torch.log(_uniform(params.seed, params.offset, logits.shape[-1]))  # (B, V) ~ Exp(1)
    sampled = (probs / noise).argmax(-1)
    params.offset.add_(1)
    return torch.where(params.temperature == 0, greedy, sampled)


def _filter(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks (-inf) what top-k then top-p drop.  # (B, V) -> (B, V)"""
    B, V = z.shape
    sorted_z, order = z.sort(dim=-1, descending=True, stable=True)  # ties: lower id first
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B,)
    kth = sorted_z.gather(1, (k - 1)[:, None])  # (B, 1)
    sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))  # top-k keeps ties with the k-th
    p = torch.softmax(sorted_z, dim=-1)
    mass_before = p.cumsum(-1) - p  # (B, V)
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True
    keep = keep & (sorted_z > float("-inf"))
    return torch.full_like(z, float("-inf")).scatter(1, order, sorted_z.masked_fill(~keep, float("-inf")))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 values in [0, 2^32); products stay < 2^63."""
    for multiplier in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        x = x ^ (x >> 16)
        x = (x * multiplier) & _M32
    return x ^ (x >> 15)


def _uniform(seed: torch.Tensor, offset: torch.Tensor, V: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): u[b, v] = hash(seed[b], offset[b], v).  # (B,), (B,) -> (B, V)"""
    row = _mix32(_mix32(seed) ^ (offset & _M32))  # (B,)
    h = _mix32(row[:, None] ^ torch.arange(V, device=seed.device))  # (B, V)
    return ((h >> 8).float() + 0.5) * (1.0 / 2**24)  # 24 random bits: exact in float32, never 0 or 1


# --- step API -----------------------------------------------------------------------------------------


def prefill(model: Transformer, cache: KVCache, rows: Sequence[int], prompts: Sequence[Sequence[int]],
            ids: torch.Tensor | None, prefix_adapters: Sequence[str] | None = None) -> torch.Tensor:
    """Writes each prompt at positions 0..len-1 of its cache row; logits at each last prompt token (B, V).

    prefix_adapters: prefix caching on a paged cache, each row's adapter identity (its digest, "" for the base).
    Each row is freed, then takes the cached blocks of its prompt's longest cached run of full blocks
    (`KVCache.share_prefix`); only the rest is computed, and the row's full prompt blocks are registered after."""
    lengths = [len(p) for p in prompts]
    if not prompts:
        raise RequestError("prefill needs at least one prompt")
    if len(rows) != len(prompts) or len(set(rows)) != len(rows):
        raise RequestError(f"prefill needs one distinct cache row per prompt; got rows {list(rows)} "
                           f"for {len(prompts)} prompts")
    if min(lengths) < 1 or max(lengths) > cache.max_seq:
        raise RequestError(f"prompt lengths {lengths} must be between 1 and the cache's max_seq={cache.max_seq}")
    if min(rows) < 0 or max(rows) >= cache.max_batch:
        raise RequestError(f"cache rows {list(rows)} out of range for max_batch={cache.max_batch}")
    B, T = len(prompts), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long)  # right-padded; padding is never attended by a real token
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    V = model.config.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= V:
        raise RequestError(f"prompt token ids must be in [0, {V}) for this base; "
                           f"got {int(tokens.min())}..{int(tokens.max())}")
    starts = [0] * B
    if prefix_adapters is not None:
        if len(prefix_adapters) != B:
            raise RequestError(f"prefix_adapters has {len(prefix_adapters)} entries for {B} prompts; give one each")
        cache.free(rows)  # a retried prefill (engine) starts its rows clean: no half-shared tables
        starts = [cache.share_prefix(r, a, p) for r, a, p in zip(rows, prefix_adapters, prompts)]
        T = max(n - s for n, s in zip(lengths, starts))
        tokens = torch.zeros(B, T, dtype=torch.long)  # the uncached suffixes, right-padded
        for b, (p, s) in enumerate(zip(prompts, starts)):
            tokens[b, : len(p) - s] = torch.as_tensor(p[s:], dtype=torch.long)
    cache.allocate(rows, lengths)  # CapacityError when the cache's free blocks do not hold the prompts
    step = cache.step(rows, T, starts=torch.tensor(starts, dtype=torch.long))
    last = torch.tensor(lengths, dtype=torch.long) - torch.tensor(starts, dtype=torch.long) - 1
    logits = model(tokens.to(model.device), ids, cache, step=step, logits_at=last.to(model.device))  # (B, V)
    cache.lengths[torch.as_tensor(rows, dtype=torch.long).cpu()] = torch.tensor(lengths, dtype=torch.long)
    if prefix_adapters is not None:
        for r, a, p in zip(rows, prefix_adapters, prompts):
            cache.register_prefix(r, a, p)
    return logits


def decode(model: Transformer, cache: KVCache, rows: torch.Tensor, tokens: torch.Tensor,
           ids: torch.Tensor | None) -> torch.Tensor:
    """One token per row at position lengths[row], which then advances.  # rows (B,), tokens (B,) -> (B, V)

    Keep `rows` on the CPU: the cache plans positions and the key span on the host. A row whose next
    position starts a block takes one (CapacityError when none is free: the serving engine preempts first).
    """
    rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    if rows.numel() == 0:
        raise RequestError("decode needs at least one row")
    if int(cache.lengths[rows].max()) >= cache.max_seq:
        raise RequestError(f"KV cache row is full (max_seq={cache.max_seq}); free rows or use a longer cache")
    cache.allocate(rows, cache.lengths[rows] + 1)
    step = cache.step(rows, 1)
    logits = model(tokens.view(-1, 1), ids, cache, step=step)[:, 0]  # (B, V)
    cache.lengths[rows] += 1
    return logits


# --- generate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    text: str | None  # None when the base has no tokenizer (token ids in, token ids out)
    token_ids: list[int]  # generated tokens, without the stop token
    finish_reason: str  # "stop" (stop token or string) | "length"
    prompt_tokens: int
    completion_tokens: int


def generate(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], ids: torch.Tensor | None, *,
             max_new_tokens: int, sampling: SamplingBatch, stop_ids: Sequence[int] = (),
             stop: Sequence[str] = ()) -> list[Completion]:
    """Completes every prompt in one batch: one prefill, then one batched decode per token.

    Rows that stopped keep decoding (their tokens are dropped) until every row stopped; the `done`
    flags are read back every STOP_CHECK_EVERY steps, and stop strings are looked for at the same times.
    """
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B = len(prompts)
    c, S = model.config, max(map(len, prompts)) + max_new_tokens
    # Blocks for exactly what this batch can hold (rows never wait: no preemption here).
    blocks = sum(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in prompts)
    cache = KVCache(c.num_hidden_layers, B, c.num_key_value_heads, S, c.head_dim, dtype=model.dtype,
                    device=model.device, num_blocks=blocks)
    rows = torch.arange(B)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=model.device)  # (B, max_new)
    stop_t = torch.tensor(list(stop_ids), dtype=torch.long, device=model.device)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    tokens = sample(prefill(model, cache, rows.tolist(), prompts, ids), sampling)  # (B,)
    n = 1
    out[:, 0] = tokens
    while n < max_new_tokens:
        done |= torch.isin(tokens, stop_t)
        if n % STOP_CHECK_EVERY == 0 and _all_done(done, out[:, :n], tokenizer, stop):
            break
        tokens = sample(decode(model, cache, rows, tokens, ids), sampling)
        out[:, n] = tokens
        n += 1
    return [_completion(row, len(p), tokenizer, set(stop_ids), stop) for row, p in zip(out[:, :n].tolist(), prompts)]


def _all_done(done: torch.Tensor, out: torch.Tensor, tokenizer, stop: Sequence[str]) -> bool:
    if stop:  # stop strings need the text: one read of the tokens so far
        for b, row in enumerate(out.tolist()):
            if any(s in tokenizer.decode(row) for s in stop):
                done[b] = True
    return bool(done.all())


def _completion(row: list[int], prompt_tokens: int, tokenizer, stop_ids: set[int], stop: Sequence[str]) -> Completion:
    """Cuts a row at its first stop token or stop string (excluded from the result)."""
    reason = "length"
    cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
    if cut is not None:
        row, reason = row[:cut], "stop"
    if tokenizer is None:  # Base.generate refuses stop strings without a tokenizer
        return Completion(None, row, reason, prompt_tokens, len(row))
    text = tokenizer.decode(row)
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        text, reason = text[: min(hits)], "stop"
        row = _tokens_covering(row, text, tokenizer)
    return Completion(text, row, reason, prompt_tokens, len(row))


def _tokens_covering(row: list[int], text: str, tokenizer) -> list[int]:
    """The shortest prefix of `row` whose text contains `text` (the tokens up to a stop string)."""
    for i in range(len(row) + 1):
        if len(tokenizer.decode(row[:i])) >= len(text):
            return row[:i]
    return row
