"""The running batch: KV cache rows, one batched decode per step, per-row stopping and streaming.

Engine thread only. Batch tensors (cache rows, slot ids, sampling parameters) are rebuilt only
when a row joins or leaves; in steady state a step feeds the previous step's sampled tokens (B,)
straight back into `base.decode` and reads them to the host once (`.tolist()`) for stopping.

The KV cache is paged under a memory budget (runtime/model/kv_cache.py): a row takes blocks as its tokens
arrive. When a decode step needs more blocks than are free, the most recently admitted rows are preempted
until it fits: their blocks are freed and they wait (`preempted`, resumed before any new request) to be
recomputed: one prefill of the prompt and the tokens generated so far, whose logits are dropped (the next
token was sampled already), after which decoding goes on as if nothing happened. Sampling is counter-based
per row, so a preempted row samples what it would have.

With prefix caching on, every prefill (admission and recomputation) first takes the cached blocks of the longest
run of its tokens' full blocks under the row's adapter and computes only the rest (KVCache.share_prefix); the
row's full prompt blocks are then named for later rows, and a finished row's full blocks of prompt and answer
too (a next chat turn repeats both). Freed rows leave those blocks cached (evictable), and the free-block
counts used for admission and preemption include them.

Faults are isolated per row: a row whose preparation, prefill, sampling or text handling raises fails
alone (its handle gets the error) and every other row goes on. A batched prefill or sampling call that
raises is retried one row at a time, which gives the same tokens (sampling is counter-based per row) and
finds the row at fault. Only `base.decode` fails as a batch (the engine then fails the running rows):
its error cannot be tied to one row.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from adapterhub.runtime.generate import SamplingBatch, sample
from adapterhub.serve.logits import Penalties, token_logprobs
from adapterhub.serve.requests import Delta, Finished, RequestHandle, SamplingParams, TokenLogprob
from adapterhub.serve.text import IncrementalDecoder, StopMatcher

log = logging.getLogger("adapterhub.serve")


@dataclass(eq=False)
class Row:
    handle: RequestHandle
    prompt: list[int] = field(repr=False)
    params: SamplingParams
    slot_ids: torch.Tensor  # (1,) pinned pool slot
    adapter: str = ""  # the adapter's digest, "" for the base: what the prefix cache's keys start from
    index: int = -1  # cache row
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache held at admission (usage.prompt_tokens_details)
    last_token: int = -1
    outputs: list[int] = field(default_factory=list, repr=False)  # sampled tokens fed back (for recomputing)
    decoder: IncrementalDecoder | None = None
    stops: StopMatcher | None = None
    pending: list[TokenLogprob] = field(default_factory=list)  # log-probabilities of tokens whose text is held back
    is_released: bool = False  # its cache row and slot pin are given back (finished or failed)


class RowBatch:
    def __init__(self, base, max_batch: int, max_seq: int, metrics, on_finish, kv_memory: int | None = None,
                 use_prefix_caching: bool = True):
        self.base = base
        self.cache = base.new_cache(max_batch, max_seq, memory=kv_memory)
        self.use_prefix_caching = use_prefix_caching
        self.preempted: deque[Row] = deque()  # rows whose blocks were taken back, oldest preemption first
        self.metrics = metrics
        self._on_finish = on_finish  # (row, status) -> None: releases the slot pin
        self._eos = set(base.stop_token_ids())  # the same stop ids as Base.generate
        self._penalties = Penalties(max_batch, base.config.vocab_size)
        self._free = list(range(max_batch - 1, -1, -1))
        self._active: list[Row] = []
        self._is_dirty = True
        self._rows_t = self._ids_t = self._tokens_t = None
        self._sampling = None
        self._params: list[SamplingParams] = []

    def __len__(self) -> int:
        return len(self._active)

    def free_rows(self) -> int:
        return len(self._free)

    def has_room(self, prompts: list[tuple[str, list[int]]]) -> bool:
        """Whether rows prefilling these (adapter, tokens) can start now: a free cache row each and blocks for one
        more token (with prefix caching, less the cached blocks they will share)."""
        if len(prompts) > len(self._free):
            return False
        if self.use_prefix_caching:
            blocks = self.cache.blocks_to_start([(a, tokens, len(tokens) + 1) for a, tokens in prompts])
        else:
            blocks = sum(self.cache.blocks_for(len(tokens) + 1) for _, tokens in prompts)
        return blocks <= self.cache.free_blocks

    def resume(self) -> None:
        """Recomputes preempted rows, oldest first, while they fit (module docstring)."""
        rows = []  # each recomputes len(prompt) + generated - 1 tokens, then decodes
        while self.preempted and self.has_room([(r.adapter, _refilled(r)) for r in [*rows, self.preempted[0]]]):
            row = self.preempted.popleft()
            if row.handle.is_cancelled:
                self._finish(row, "cancelled", has_tail=False)
            else:
                rows.append(row)
        for row in rows:
            row.index = self._free.pop()
            self._active.append(row)
            self._penalties.start(row.index, row.prompt, row.params, self.base.model.device, row.outputs)
        if rows:
            self._is_dirty = True
            self._refill(rows)

    def prefill(self, rows: list[Row]) -> None:
        """Admits new requests: one batched prefill of their prompts, first token sampled."""
        firsts = self._first_tokens([row for row in rows if self._guarded(row, self._prepare)])
        for row, token, logprob in firsts:
            self._guarded(row, self._advance, token, logprob)
        self.metrics.add_tokens(len(firsts))

    def step(self) -> None:
        """One decode step for every active row, whatever its adapter (rows preempted first if blocks run out)."""
        self._make_room()
        if self._is_dirty:
            self._rebuild()
        active, params = list(self._active), self._params
        raw = self.base.decode(self.cache, self._rows_t, self._tokens_t, self._ids_t)  # (B, V)
        tokens = self._sample(active, self._penalties.apply(raw, self._rows_t, params))
        for row, token, logprob in zip(active, tokens, self._extras(self._rows_t, raw, tokens, params)):
            if token is not None:
                self._guarded(row, self._advance, token, logprob)
        self.metrics.add_tokens(len(active))

    def fail_all(self, error: Exception) -> None:
        while self.preempted:
            row = self.preempted.popleft()
            self._release(row, type(error).__name__)
            row.handle.fail(error)
        for row in list(self._active):
            self._release(row, type(error).__name__)
            row.handle.fail(error)

    def _prepare(self, row: Row) -> None:
        row.index = self._free.pop()
        self._active.append(row)  # from here on `_release` frees the row, whatever fails next
        self._is_dirty = True
        row.decoder = IncrementalDecoder(self.base.tokenizer.decode)
        row.stops = StopMatcher(row.params.stop)
        _sampling_batch([row.params], [0])  # parameters torch cannot hold fail this row here, not the batch later
        self._penalties.start(row.index, row.prompt, row.params, self.base.model.device)

    def _first_tokens(self, rows: list[Row]) -> list[tuple[Row, int, TokenLogprob | None]]:
        """Prefill and first sample of `rows`; if the batch raises, each row alone (prefill rewrites positions
        0..len-1 of its cache row, so a half-done batch leaves nothing behind)."""
        if not rows:
            return []
        try:
            if self.use_prefix_caching:  # looked up before the prefill shares and registers blocks
                for row in rows:
                    row.cached_tokens = self.cache.cached_prefix(row.adapter, row.prompt)
            ids = torch.cat([r.slot_ids for r in rows])  # (B,)
            raw = self.base.prefill(self.cache, [r.index for r in rows], [r.prompt for r in rows], ids,
                                    self._prefix_adapters(rows))
            params, rows_t = [r.params for r in rows], torch.tensor([r.index for r in rows], dtype=torch.long)
            logits = self._penalties.apply(raw, rows_t, params)
            tokens = sample(logits, _sampling_batch(params, [0] * len(rows))).tolist()
            return list(zip(rows, tokens, self._extras(rows_t, raw, tokens, params)))
        except Exception as error:
            if len(rows) == 1:
                self._fail(rows[0], error)
                return []
            log.warning("prefill of %d requests failed (%r); retrying them one by one", len(rows), error)
            return [pair for row in rows for pair in self._first_tokens([row])]

    def _make_room(self) -> None:
        """Preempts the most recently admitted rows until this step's new blocks are free (one row always fits:
        the cache holds one row of max_seq tokens, base.new_cache)."""
        while len(self._active) > 1:
            indices = [r.index for r in self._active]
            if self.cache.blocks_to_grow(indices, self.cache.lengths[indices] + 1) <= self.cache.free_blocks:
                return
            self._preempt(self._active[-1])

    def _preempt(self, row: Row) -> None:
        self.cache.free([row.index])
        self._free.append(row.index)
        row.index = -1
        self._active.remove(row)
        self._is_dirty = True
        self.preempted.append(row)
        self.metrics.add_preemption()

    def _refill(self, rows: list[Row]) -> None:
        """Rebuilds the cache of resumed rows: prompt + every generated token but the last (the next input)."""
        try:
            ids = torch.cat([r.slot_ids for r in rows])  # (B,)
            self.base.prefill(self.cache, [r.index for r in rows], [_refilled(r) for r in rows], ids,
                              self._prefix_adapters(rows))
        except Exception as error:
            if len(rows) == 1:
                return self._fail(rows[0], error)
            for row in rows:
                self._refill([row])

    def _prefix_adapters(self, rows: list[Row]) -> list[str] | None:
        return [r.adapter for r in rows] if self.use_prefix_caching else None

    def _sample(self, active: list[Row], logits: torch.Tensor) -> list[int | None]:
        """The next token of every row (None: that row failed)."""
        try:
            self._tokens_t = sample(logits, self._sampling)  # (B,)
            return self._tokens_t.tolist()
        except Exception as error:
            log.warning("sampling %d rows failed (%r); sampling them one by one", len(active), error)
            self._is_dirty = True  # the batch's offsets are unknown now: rebuilt from each row's count
            return [self._sample_alone(row, logits[i : i + 1]) for i, row in enumerate(active)]

    def _extras(self, rows_t: torch.Tensor, raw: torch.Tensor, tokens: list[int | None],
                params: list[SamplingParams]) -> list[TokenLogprob | None]:
        """After sampling: counts the tokens for the penalties, and the log-probabilities of the raw logits."""
        if not any(p.logprobs is not None or p.has_penalties for p in params):
            return [None] * len(params)
        tokens_t = torch.tensor([t if t is not None else 0 for t in tokens], dtype=torch.long)  # None: a failed row
        self._penalties.record(rows_t, tokens_t, params)
        return token_logprobs(raw, tokens_t, params)

    def _sample_alone(self, row: Row, logits: torch.Tensor) -> int | None:
        try:  # offset = tokens sampled so far, as in the batch: the same token the batch would have drawn
            return sample(logits, _sampling_batch([row.params], [row.generated])).item()
        except Exception as error:
            self._fail(row, error)
            return None

    def _guarded(self, row: Row, fn, *args) -> bool:
        try:
            fn(row, *args)
            return True
        except Exception as error:
            self._fail(row, error)
            return False

    def _fail(self, row: Row, error: Exception) -> None:
        """This row only: frees it and gives its handle the error (an SSE error event, or a JSON error)."""
        log.error("request %s failed on the engine thread; the other rows go on", row.handle.id,
                  exc_info=(type(error), error, error.__traceback__))
        if row.is_released:  # it had finished already: its client has its answer
            return
        self._release(row, type(error).__name__)
        row.handle.fail(error)

    def _rebuild(self) -> None:
        rows = self._active
        self._rows_t = torch.tensor([r.index for r in rows], dtype=torch.long)
        self._ids_t = torch.cat([r.slot_ids for r in rows])
        self._tokens_t = torch.tensor([r.last_token for r in rows], dtype=torch.long)
        self._params = [r.params for r in rows]
        self._sampling = _sampling_batch(self._params, [r.generated for r in rows])
        self._is_dirty = False

    def _advance(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> None:
        row.last_token = token
        if row.handle.is_cancelled:
            return self._finish(row, "cancelled", has_tail=False)
        if token in self._eos and not row.params.ignore_eos:
            return self._finish(row, "stop")
        row.generated += 1
        row.outputs.append(token)
        if logprob is not None:
            row.pending.append(logprob)
        text, is_stop = row.stops.push(row.decoder.push(token))
        if text:
            row.handle.emit(Delta(text, tuple(row.pending)))
            row.pending.clear()
        if is_stop:  # the stop string and what follows it are dropped
            return self._finish(row, "stop", has_tail=False)
        if row.generated >= row.params.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: Row, reason: str, has_tail: bool = True) -> None:
        tail = ""
        if has_tail:  # held-back text: an incomplete character, a partial stop string
            tail = row.stops.push(row.decoder.flush())[0] + row.stops.flush()
        if tail or row.pending:  # the last tokens' log-probabilities go with the last delta
            row.handle.emit(Delta(tail, tuple(row.pending)))
            row.pending.clear()
        if self.use_prefix_caching and row.index >= 0:  # a next chat turn starts with this prompt and this answer
            self.cache.register_prefix(row.index, row.adapter, _refilled(row)[: int(self.cache.lengths[row.index])])
        self._release(row, "ok" if reason != "cancelled" else "cancelled")
        row.handle.emit(Finished(reason, len(row.prompt), row.generated, row.cached_tokens))

    def _release(self, row: Row, status: str) -> None:
        row.is_released = True
        if row.index >= 0:
            self.cache.free([row.index])
            self._free.append(row.index)
        if row in self._active:
            self._active.remove(row)
        self._is_dirty = True
        self._on_finish(row, status)


def _refilled(row: Row) -> list[int]:
    """What a resumed row prefills: its prompt and every generated token but the last (the next input)."""
    return row.prompt + row.outputs[:-1]


def _sampling_batch(params: list[SamplingParams], offsets: list[int]) -> SamplingBatch:
    return SamplingBatch.from_params(
        temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params], seed=[p.seed for p in params], offset=offsets,
    )
