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
    # Penalties (reference/sampling.py): OpenAI's over the generated tokens, the repetition one over all.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely
    ignore_eos: bool = False  # end-of-sequence tokens are ordinary tokens: only max_tokens or a stop string end

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the raw logits, and the `top` most likely (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str  # complete characters only; a possible stop-string prefix is held back
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens generated since the last delta, when asked for


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache at admission


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric request field."""

    low: float
    high: float
    is_integer: bool
    is_low_open: bool = False  # (low, high] instead of [low, high]

    def contains(self, value) -> bool:
        kinds = int if self.is_integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        is_above = value > self.low if self.is_low_open else value >= self.low
        return is_above and value <= self.high  # NaN compares False: rejected

    def describe(self) -> str:
        kind = "an integer" if self.is_integer else "a number"
        return f"{kind} in {'(' if self.is_low_open else '['}{self.low}, {self.high}]"


# The numeric sampling fields and their ranges, checked at the HTTP edge (`openai.py`, with the field's name)
# and again by `validate_request` for every caller of `Engine.submit`: the engine thread builds int64 / float32
# tensors from them, and a value torch cannot hold (top_k = 2**63) would fail there, on the thread every
# request shares. temperature and top_p are OpenAI's documented ranges.
RANGES = {
    "temperature": Range(0, 2, is_integer=False),
    "top_p": Range(0, 1, is_integer=False, is_low_open=True),
    "top_k": Range(0, 2**31 - 1, is_integer=True),  # 0 disables it
    "seed": Range(-(2**63), 2**63 - 1, is_integer=True),
    "presence_penalty": Range(-2, 2, is_integer=False),  # OpenAI's range
    "frequency_penalty": Range(-2, 2, is_integer=False),
    "repetition_penalty": Range(0, 100, is_integer=False, is_low_open=True),
    "logprobs": Range(0, 20, is_integer=True),  # vLLM's default --max-logprobs
}
_OPTIONAL = {"seed", "logprobs"}  # None is a value: no seed, no logprobs
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # the engine thread scans a stop string's prefixes once per token and row


def validate_request(prompt: list[int], p: SamplingParams, max_seq: int, vocab_size: int) -> None:
    """Checks once, at the boundary, everything the engine thread then trusts (→ HTTP 400)."""
    if not prompt:
        raise RequestError("the prompt is empty; send at least one token or one character")
    if len(prompt) >= max_seq:  # before looking at each token: a long list costs nothing more
        raise RequestError(
            f"the prompt has {len(prompt)} tokens but the context holds {max_seq}; shorten the prompt"
        )
    bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    _check_max_tokens(p.max_tokens, len(prompt), max_seq)
    for name, allowed in RANGES.items():
        value = getattr(p, name)
        if not (value is None and name in _OPTIONAL) and not allowed.contains(value):
            raise RequestError(f"{name} must be {allowed.describe()}, got {value!r}")
    _check_stop(p.stop)


def _check_max_tokens(max_tokens, prompt_tokens: int, max_seq: int) -> None:
    room = max_seq - prompt_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer in [1, {room}] for this prompt, got {max_tokens!r}")
    if prompt_tokens + max_tokens > max_seq:
        raise RequestError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
            f"{max_seq} tokens; use max_tokens <= {room}"
        )


def _check_stop(stop: tuple) -> None:
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop):
        shown = [s[:20] + "..." if isinstance(s, str) and len(s) > 20 else s for s in stop[:MAX_STOPS + 1]]
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOPS} strings of at most "
                           f"{MAX_STOP_CHARS} characters, got {shown!r}")


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
        self._held: list[Delta] = []  # not streaming: deltas wait here, one wake-up of the client at the end

    # engine side
    def emit(self, event) -> None:
        if not self.is_streaming:
            if isinstance(event, Delta):
                self._held.append(event)
                return
            if self._held:
                logprobs = tuple(lp for d in self._held for lp in d.logprobs)  # not sum(): quadratic in tokens
                self._deliver(Delta("".join(d.text for d in self._held), logprobs))
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
        text, _, done = await self.acomplete()
        return text, done

    async def acomplete(self) -> tuple[str, tuple[TokenLogprob, ...], Finished]:
        """(text, the tokens' log-probabilities when asked for, Finished)."""
        parts, logprobs = [], []
        async for event in self.stream():
            if isinstance(event, Delta):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
        return "".join(parts), tuple(logprobs), event

