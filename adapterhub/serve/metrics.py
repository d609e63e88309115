"""Serving metrics: counters and gauges, rendered in the Prometheus text exposition format.

The engine thread writes, HTTP handlers read; every access holds one lock (cheap: a handful of
updates per decode step, not per row).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

# Tokens/s is reported over a sliding window so an idle server drops back to 0.
_RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.batch_size = 0
        self.tokens_total = 0
        self.steps_total = 0
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.preemptions = 0
        self.kv_blocks_free = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache (admissions, recomputations)
        self.prefix_cache_hits = 0  # of those, tokens whose keys and values were cached (not recomputed)
        self.adapter_pool_bytes = 0
        self.memory: dict = {}  # set once at start: the KV budget, its blocks, the adapter dtype (set_memory)
        self.requests: Counter[str] = Counter()  # status -> count
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    def set_gauges(self, *, queue_depth: int, batch_size: int, kv_blocks_free: int | None = None,
                   adapter_pool_bytes: int | None = None) -> None:
        with self._lock:
            self.queue_depth, self.batch_size = queue_depth, batch_size
            if kv_blocks_free is not None:
                self.kv_blocks_free = kv_blocks_free
            if adapter_pool_bytes is not None:
                self.adapter_pool_bytes = adapter_pool_bytes

    def set_memory(self, *, kv_cache_bytes: int, kv_blocks: int, kv_block_tokens: int, kv_bytes_per_token: int,
                   adapter_dtype: str, adapter_bytes_per_rank: int) -> None:
        with self._lock:
            self.memory = dict(kv_cache_bytes=kv_cache_bytes, kv_blocks=kv_blocks, kv_block_tokens=kv_block_tokens,
                               kv_bytes_per_token=kv_bytes_per_token, adapter_dtype=adapter_dtype,
                               adapter_bytes_per_rank=adapter_bytes_per_rank)
            self.kv_blocks_free = kv_blocks

    def set_prefix_cache(self, *, queries: int, hits: int) -> None:
        """The KV cache's running totals (it counts them: the prefill is where the lookups happen)."""
        with self._lock:
            self.prefix_cache_queries, self.prefix_cache_hits = queries, hits

    def add_preemption(self) -> None:
        with self._lock:
            self.preemptions += 1

    def add_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_total += n
            self.steps_total += 1
            self._recent.append((now, n))
            self._trim(now)

    def add_load(self, evicted: int) -> None:
        with self._lock:
            self.adapter_loads += 1
            self.adapter_evictions += evicted

    def count_request(self, status: str) -> None:
        with self._lock:
            self.requests[status] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._recent:
                return 0.0
            return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    def snapshot(self) -> dict:
        rate = self.tokens_per_second()
        with self._lock:
            return {
                "queue_depth": self.queue_depth,
                "batch_size": self.batch_size,
                "tokens_total": self.tokens_total,
                "steps_total": self.steps_total,
                "tokens_per_second": rate,
                "adapter_loads": self.adapter_loads,
                "adapter_evictions": self.adapter_evictions,
                "preemptions": self.preemptions,
                "kv_blocks_free": self.kv_blocks_free,
                "prefix_cache_queries": self.prefix_cache_queries,
                "prefix_cache_hits": self.prefix_cache_hits,
                "adapter_pool_bytes": self.adapter_pool_bytes,
                **self.memory,
                "requests": dict(self.requests),
            }

    def prometheus(self, resident_adapters: int) -> str:
        """Prometheus text format 0.0.4: HELP/TYPE lines, then samples."""
        s = self.snapshot()
        rows = [
            ("adapterhub_queue_depth", "gauge", "Requests waiting for a batch row.", s["queue_depth"]),
            ("adapterhub_batch_size", "gauge", "Rows in the running batch.", s["batch_size"]),
            ("adapterhub_tokens_per_second", "gauge", f"Generated tokens/s over the last {_RATE_WINDOW_S:g} s.",
             round(s["tokens_per_second"], 3)),
            ("adapterhub_generated_tokens_total", "counter", "Generated tokens.", s["tokens_total"]),
            ("adapterhub_decode_steps_total", "counter", "Batched decode steps.", s["steps_total"]),
            ("adapterhub_adapter_loads_total", "counter", "Adapters installed into the pool.", s["adapter_loads"]),
            ("adapterhub_adapter_evictions_total", "counter", "Adapters evicted from the pool (LRU).",
             s["adapter_evictions"]),
            ("adapterhub_adapters_resident", "gauge", "Adapters resident in the pool.", resident_adapters),
            ("adapterhub_preemptions_total", "counter", "Rows preempted (KV blocks freed, recomputed later).",
             s["preemptions"]),
            ("adapterhub_kv_cache_bytes", "gauge", "KV cache budget (bytes of key and value blocks).",
             s.get("kv_cache_bytes", 0)),
            ("adapterhub_kv_cache_blocks", "gauge", "KV cache blocks in the budget.", s.get("kv_blocks", 0)),
            ("adapterhub_kv_cache_block_tokens", "gauge", "Tokens per KV cache block.", s.get("kv_block_tokens", 0)),
            ("adapterhub_kv_cache_blocks_free", "gauge", "KV cache blocks no row holds (free, or cached and evictable).",
             s["kv_blocks_free"]),
            ("adapterhub_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
             s["prefix_cache_queries"]),
            ("adapterhub_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache (not recomputed).",
             s["prefix_cache_hits"]),
            ("adapterhub_adapter_pool_bytes", "gauge", "Bytes of the adapter stacks.", s["adapter_pool_bytes"]),
        ]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP adapterhub_requests_total Finished requests by status.",
                  "# TYPE adapterhub_requests_total counter"]
        lines += [f'adapterhub_requests_total{{status="{k}"}} {v}' for k, v in sorted(s["requests"].items())]
        return "\n".join(lines) + "\n"
