"""The running batch: KV cache rows, one batched decode per step, per-row stopping and streaming.

Engine thread only. Batch tensors (cache rows, slot ids, sampling parameters) are rebuilt only
when a row joins or leaves; in steady state a step feeds the previous step's sampled tokens (B,)
straight back into `base.decode` and reads them to the host once (`.tolist()`) for stopping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterhub.runtime.generate import SamplingBatch, sample
from adapterhub.serve.requests import Delta, Finished, RequestHandle, SamplingParams
from adapterhub.serve.text import IncrementalDecoder, StopMatcher


@dataclass(eq=False)
class Row:
    handle: RequestHandle
    prompt: list[int] = field(repr=False)
    params: SamplingParams
    slot_ids: torch.Tensor  # (1,) pinned pool slot
    index: int = -1  # cache row
    generated: int = 0
    last_token: int = -1
    decoder: IncrementalDecoder | None = None
    stops: StopMatcher | None = None


class RowBatch:
    def __init__(self, base, max_batch: int, max_seq: int, metrics, on_finish):
        self.base = base
        self.cache = base.new_cache(max_batch, max_seq)
        self.metrics = metrics
        self._on_finish = on_finish  # (row, status) -> None: releases the slot pin
        self._eos = set(base.stop_token_ids())  # the same stop ids as Base.generate
        self._free = list(range(max_batch - 1, -1, -1))
        self._active: list[Row] = []
        self._is_dirty = True
        self._rows_t = self._ids_t = self._tokens_t = None
        self._sampling = None

    def __len__(self) -> int:
        return len(self._active)

    def free_rows(self) -> int:
        return len(self._free)

    def prefill(self, rows: list[Row]) -> None:
        """Admits new requests: one batched prefill of their prompts, first token sampled."""
        for row in rows:
            row.index = self._free.pop()
            row.decoder = IncrementalDecoder(self.base.tokenizer.decode)
            row.stops = StopMatcher(row.params.stop)
        self._active.extend(rows)  # first, so that fail_all frees them if the prefill raises
        self._is_dirty = True
        ids = torch.cat([r.slot_ids for r in rows])  # (B,)
        logits = self.base.prefill(self.cache, [r.index for r in rows], [r.prompt for r in rows], ids)
        tokens = sample(logits, _sampling_batch([r.params for r in rows], [0] * len(rows))).tolist()
        for row, token in zip(rows, tokens):
            self._advance(row, token)
        self.metrics.add_tokens(len(rows))

    def step(self) -> None:
        """One decode step for every active row, whatever its adapter."""
        if self._is_dirty:
            self._rebuild()
        active = list(self._active)
        logits = self.base.decode(self.cache, self._rows_t, self._tokens_t, self._ids_t)  # (B, V)
        self._tokens_t = sample(logits, self._sampling)  # (B,)
        for row, token in zip(active, self._tokens_t.tolist()):
            self._advance(row, token)
        self.metrics.add_tokens(len(active))

    def fail_all(self, error: Exception) -> None:
        for row in list(self._active):
            self._release(row, type(error).__name__)
            row.handle.fail(error)

    def _rebuild(self) -> None:
        rows = self._active
        self._rows_t = torch.tensor([r.index for r in rows], dtype=torch.long)
        self._ids_t = torch.cat([r.slot_ids for r in rows])
        self._tokens_t = torch.tensor([r.last_token for r in rows], dtype=torch.long)
        self._sampling = _sampling_batch([r.params for r in rows], [r.generated for r in rows])
        self._is_dirty = False

    def _advance(self, row: Row, token: int) -> None:
        row.last_token = token
        if row.handle.is_cancelled:
            return self._finish(row, "cancelled", has_tail=False)
        if token in self._eos:
            return self._finish(row, "stop")
        row.generated += 1
        text, is_stop = row.stops.push(row.decoder.push(token))
        if text:
            row.handle.emit(Delta(text))
        if is_stop:  # the stop string and what follows it are dropped
            return self._finish(row, "stop", has_tail=False)
        if row.generated >= row.params.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: Row, reason: str, has_tail: bool = True) -> None:
        if has_tail:  # held-back text: an incomplete character, a partial stop string
            tail = row.stops.push(row.decoder.flush())[0] + row.stops.flush()
            if tail:
                row.handle.emit(Delta(tail))
        self._release(row, "ok" if reason != "cancelled" else "cancelled")
        row.handle.emit(Finished(reason, len(row.prompt), row.generated))

    def _release(self, row: Row, status: str) -> None:
        self.cache.free([row.index])
        self._free.append(row.index)
        self._active.remove(row)
        self._is_dirty = True
        self._on_finish(row, status)


def _sampling_batch(params: list[SamplingParams], offsets: list[int]) -> SamplingBatch:
    return SamplingBatch.from_params(
        temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params], seed=[p.seed for p in params], offset=offsets,
    )
