"""Give the heap that prefills freed back to the OS, between engine steps, at most every few seconds.

A bf16 prefill of a few thousand tokens allocates activations of tens of MB; glibc's malloc keeps what
they free for reuse, and raises its mmap threshold as large blocks come and go, so a server's resident
memory climbs to the high-water mark of the largest batches it has seen and stays there (the soak in
bench/soak.py measured +10.4 % over three minutes of varied prompts). `malloc_trim(0)` returns the free
pages (~130-150 MB after a 4 x 2,000-token prefill of the tiny model, in ~12 ms on 2 cores); doing it at
most every TRIM_EVERY seconds costs a fraction of a percent. A lower fixed mmap threshold would bound
memory too, but re-faulting every large activation made prefill 55 % slower (measured, same machine).
Elsewhere than glibc there is no `malloc_trim` and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

TRIM_EVERY = 10.0  # seconds between two trims at most


class HeapTrimmer:
    def __init__(self, every: float = TRIM_EVERY, clock=time.monotonic):
        self.every, self.clock = every, clock
        self._trim = _malloc_trim()
        self._last = clock()
        self.trims = 0

    def maybe_trim(self) -> bool:
        """Trim when `every` seconds passed since the last trim; True when it trimmed."""
        now = self.clock()
        if self._trim is None or now - self._last < self.every:
            return False
        self._trim(0)
        self._last, self.trims = now, self.trims + 1
        return True


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if function is not None:
        function.argtypes, function.restype = (ctypes.c_size_t,), ctypes.c_int
    return function
