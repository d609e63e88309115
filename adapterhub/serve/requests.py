"""A request's parameters, its validation, and the handle its events stream through.

The engine thread emits events; the client side reads them either from asyncio (the HTTP API:
`stream()`, events delivered with `loop.call_soon_threadsafe`) or by blocking (`events()`).
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from adapterhub.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str  # complete characters only; a possible stop-string prefix is held back


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: Exception


def validate_request(prompt: list[int], p: SamplingParams, max_seq: int, vocab_size: int) -> None:
    """Checks once, at the boundary, everything the engine thread then trusts (→ HTTP 400)."""
    if not prompt:
        raise RequestError("the prompt is empty; send at least one token or one character")
    bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if len(prompt) >= max_seq:
        raise RequestError(
            f"the prompt has {len(prompt)} tokens but the context holds {max_seq}; shorten the prompt"
        )
    if len(prompt) + p.max_tokens > max_seq:
        raise RequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the context of "
            f"{max_seq} tokens; use max_tokens <= {max_seq - len(prompt)}"
        )
    if not p.temperature >= 0:  # also rejects NaN
        raise RequestError(f"temperature must be >= 0, got {p.temperature!r}")
    if not 0 < p.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        raise RequestError(f"top_k must be an integer >= 0 (0 disables it), got {p.top_k!r}")
    if p.seed is not None and not isinstance(p.seed, int):
        raise RequestError(f"seed must be an integer, got {p.seed!r}")
    if not all(isinstance(s, str) for s in p.stop) or len(p.stop) > 4:
        raise RequestError(f"stop must be a string or a list of at most 4 strings, got {list(p.stop)!r}")


class RequestHandle:
    """One request's event stream: Delta*, then Finished or Failed."""

    def __init__(self, request_id: str, model: str, prompt_tokens: int,
                 loop: asyncio.AbstractEventLoop | None, is_streaming: bool = True):
        self.id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.is_streaming = is_streaming
        self.is_cancelled = False
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._held: list[str] = []  # not streaming: deltas wait here, one wake-up of the client at the end

    # engine side
    def emit(self, event) -> None:
        if not self.is_streaming:
            if isinstance(event, Delta):
                self._held.append(event.text)
                return
            if self._held:
                self._deliver(Delta("".join(self._held)))
                self._held = []
        self._deliver(event)

    def _deliver(self, event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone: nobody listens any more
            self.is_cancelled = True

    def fail(self, error: Exception) -> None:
        self.emit(Failed(error))

    # client side
    def cancel(self) -> None:
        """Frees the request's row at the next step (e.g. the HTTP client disconnected)."""
        self.is_cancelled = True

    async def stream(self) -> AsyncIterator[Delta | Finished]:
        while True:
            event = await self._queue.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return

    def events(self) -> Iterator[Delta | Finished]:
        while True:
            event = self._queue.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return

    def result(self) -> tuple[str, Finished]:
        """Blocks until done: (text, Finished)."""
        parts = []
        for event in self.events():
            if isinstance(event, Delta):
                parts.append(event.text)
        return "".join(parts), event

    async def aresult(self) -> tuple[str, Finished]:
        parts = []
        async for event in self.stream():
            if isinstance(event, Delta):
                parts.append(event.text)
        return "".join(parts), event

