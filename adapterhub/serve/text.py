"""Streaming text: incremental detokenization (UTF-8 safe) and stop-string matching.

Both run on the engine thread once per generated token per row, so they work on short windows
instead of re-decoding the whole completion.
"""

from __future__ import annotations

from typing import Callable, Sequence

# A byte-level tokenizer decodes an incomplete UTF-8 sequence to U+FFFD; such text is held back
# until the following tokens complete the character.
_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    It decodes a short window: ``ids[prefix:]`` against ``ids[prefix:read]`` (the part already
    emitted), so each step costs O(window), not O(completion). Decoding a window that starts a few
    tokens back keeps tokenizers that merge spaces across tokens (SentencePiece ``▁``) correct.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:read] are fully emitted

    def push(self, token: int) -> str:
        """Adds one token id; returns the newly complete text (possibly "")."""
        self._ids.append(token)
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """Text still held back at the end of a completion (an incomplete character stays U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]


class StopMatcher:
    """Finds the first stop string in streamed text and holds back a possible partial match.

    ``push(delta)`` returns ``(safe_text, stopped)``: text that can be sent now, and whether a stop
    string was found (the stop string and everything after it are dropped, as OpenAI does).
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self._stops:
            return delta, False
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        keep = self._held_back(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stops):
                return n
        return 0
