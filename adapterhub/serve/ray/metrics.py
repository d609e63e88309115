"""/metrics of a Ray Serve application: every replica's counters, per replica, in the Prometheus text format.

Ray Serve routes each call to one replica and has no broadcast, so the replicas report instead: every
half second each sends its snapshot (the engine's `Metrics` plus adapter hits and misses) to `MetricsBoard`,
a one-replica deployment, and the ingress keeps the board's latest view. A replica that stops reporting for
`STALE_S` (it died; Ray Serve starts another under a new name) leaves the listing.

Series keep the single-process names with a ``replica`` label (sum them across replicas in PromQL);
``adapterhub_adapter_hit_ratio`` is the cluster's hits / (hits + misses) over the replicas listed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger("adapterhub.serve.ray")

STALE_S = 5.0
REFRESH_S = 0.5

# (snapshot key, metric name, type, help), one series per replica.
_SERIES = [
    ("queue_depth", "adapterhub_queue_depth", "gauge", "Requests waiting for a batch row."),
    ("batch_size", "adapterhub_batch_size", "gauge", "Rows in the running batch."),
    ("tokens_per_second", "adapterhub_tokens_per_second", "gauge", "Generated tokens/s over the last 10 s."),
    ("tokens_total", "adapterhub_generated_tokens_total", "counter", "Generated tokens."),
    ("steps_total", "adapterhub_decode_steps_total", "counter", "Batched decode steps."),
    ("hits", "adapterhub_adapter_hits_total", "counter", "Requests whose adapter was resident when they arrived."),
    ("misses", "adapterhub_adapter_misses_total", "counter", "Requests whose adapter had to be loaded."),
    ("adapter_loads", "adapterhub_adapter_loads_total", "counter", "Adapters installed into the pool."),
    ("adapter_evictions", "adapterhub_adapter_evictions_total", "counter", "Adapters evicted from the pool."),
    ("prefix_cache_queries", "adapterhub_prefix_cache_queries_total", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "adapterhub_prefix_cache_hits_total", "counter",
     "Prompt tokens found in the prefix cache (not recomputed)."),
]


class MetricsBoard:
    """A Ray Serve deployment class (one replica): the latest snapshot of every engine replica."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, dict]] = {}

    def report(self, snapshot: dict) -> None:
        self._latest[snapshot["replica"]] = (time.monotonic(), snapshot)

    def collect(self) -> dict[str, dict]:
        now = time.monotonic()
        self._latest = {k: v for k, v in self._latest.items() if now - v[0] < STALE_S}
        return {k: snapshot for k, (_, snapshot) in self._latest.items()}


class ClusterMetrics:
    """The ingress's metrics: what `api.create_app` calls on `engine.metrics`, over every replica."""

    def __init__(self, board) -> None:
        self._board = board
        self._lock = threading.Lock()
        self._ingress: Counter[str] = Counter()  # requests the ingress refused (4xx before any replica)
        self._retries = 0  # requests sent again because their replica was lost
        self._replicas: dict[str, dict] = {}
        self._is_closing = threading.Event()
        threading.Thread(target=self._refresh_loop, name="adapterhub-metrics", daemon=True).start()

    def count_request(self, status: str) -> None:
        with self._lock:
            self._ingress[status] += 1

    def count_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def replicas(self) -> dict[str, dict]:
        """replica name -> its latest snapshot."""
        with self._lock:
            return dict(self._replicas)

    def snapshot(self) -> dict:
        """Sums over the replicas (what /health shows), and the replica count."""
        replicas = self.replicas().values()
        total = {key: sum(r[key] for r in replicas) for key in ("queue_depth", "batch_size", "tokens_total",
                                                                "hits", "misses")}
        return {**total, "replicas": len(replicas)}

    def resident(self) -> dict[str, str]:
        merged = {}
        for snapshot in self.replicas().values():
            merged.update(snapshot["resident"])
        return merged

    def prometheus(self, resident_adapters: int | None = None) -> str:
        """Prometheus text format 0.0.4. (`resident_adapters`: the app's argument; here per replica instead.)"""
        replicas = sorted(self.replicas().items())
        with self._lock:
            ingress, retries = dict(self._ingress), self._retries
        lines = _block("adapterhub_replicas", "gauge", "Replicas reporting to the ingress.", [("", len(replicas))])
        lines += _block("adapterhub_replica_info", "gauge", "One per replica: its process id.",
                        [(f'{{replica="{name}",pid="{s["pid"]}"}}', 1) for name, s in replicas])
        for key, name, kind, doc in _SERIES:
            lines += _block(name, kind, doc, [(f'{{replica="{r}"}}', round(s[key], 3)) for r, s in replicas])
        lines += _block("adapterhub_adapters_resident", "gauge", "Adapters resident in the pool.",
                        [(f'{{replica="{r}"}}', len(s["resident"])) for r, s in replicas])
        requests = [(f'{{replica="{r}",status="{status}"}}', n) for r, s in replicas
                    for status, n in sorted(s["requests"].items())]
        requests += [(f'{{replica="ingress",status="{status}"}}', n) for status, n in sorted(ingress.items())]
        lines += _block("adapterhub_requests_total", "counter", "Finished requests by status.", requests)
        lines += _block("adapterhub_ingress_retries_total", "counter",
                        "Requests sent again to another replica because theirs was lost before sending text.",
                        [("", retries)])
        hits = sum(s["hits"] for _, s in replicas)
        looked_up = hits + sum(s["misses"] for _, s in replicas)
        lines += _block("adapterhub_adapter_hit_ratio", "gauge",
                        "Adapter hits / (hits + misses) over the replicas listed.",
                        [("", round(hits / looked_up, 4) if looked_up else 0.0)])
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._is_closing.set()

    def _refresh_loop(self) -> None:
        while not self._is_closing.wait(REFRESH_S):
            try:
                replicas = self._board.collect.remote().result(timeout_s=10)
            except Exception as error:  # the board restarts like any replica: keep the last view meanwhile
                log.debug("metrics collection failed: %s", error)
                continue
            with self._lock:
                self._replicas = replicas


def _block(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"] + [f"{name}{labels} {value}" for labels, value in samples]
