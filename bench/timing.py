"""The one timing primitive every benchmark uses: the median wall time of repeated calls."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median seconds of `repeats` calls of fn(); one untimed warm-up call first unless `warmup` is False
    (a push is not idempotent in cost: a warm-up would make every timed push a dedup)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
