"""A simulation of adapter-affinity routing at a scale this machine cannot run: thousands of adapters, tens of
replicas, Zipf traffic. No Ray needed; seconds to run (`python -m bench.scaleout --simulate-only`).

The routing policy is modeled on Ray Serve 2.60's multiplexed routing (`PowerOfTwoChoicesRequestRouter` with
`MultiplexMixin.apply_multiplex_routing`, ray/serve/_private/request_router/):
1. candidates are the replicas that report the request's model id loaded; two are drawn at random and the one
   with fewer requests in flight takes it if it has room (`max_ongoing_requests`);
2. when no replica holds the model, or both drawn holders are full, the next try draws from the replicas
   with the fewest models loaded (all replicas, once every pool is full); the chosen replica loads the model
   and its LRU (`max_num_models_per_replica`) evicts the least recently used one;
3. when no drawn replica has room the request waits (Ray retries with backoff) and is routed again, in arrival
   order, as soon as a replica finishes a request.
Default routing is the same power of two choices over all replicas, with no model preference.

Simplifications: model ids reach the router at once (Ray pushes them within ~0.1 s); loading takes no time;
every request takes the same service time; Ray's one-fallback-per-model rule for concurrent first requests is
left out.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SimResult:
    routing: str
    hit_ratio: float
    imbalance: float  # max requests served by one replica / the mean
    busiest_share: float  # the busiest replica's share of all requests
    mean_wait: float  # in service times


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


class _Replica:
    def __init__(self, capacity: int) -> None:
        self.models: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self.capacity = capacity
        self.ongoing = 0
        self.served = 0

    def use(self, model: int) -> bool:
        """Touches or loads `model`; True when it was resident (a hit)."""
        if model in self.models:
            self.models.move_to_end(model)
            return True
        if len(self.models) >= self.capacity:
            self.models.popitem(last=False)
        self.models[model] = None
        return False


def simulate(adapters: int, replicas: int, pool: int, max_ongoing: int, routing: str, *, zipf_s: float = 1.1,
             requests: int = 200_000, utilization: float = 0.8, seed: int = 0) -> SimResult:
    rng = random.Random(seed)
    models = np.random.default_rng(seed).choice(adapters, size=requests, p=zipf_weights(adapters, zipf_s))
    # Poisson arrivals; service time 1: `utilization` of the cluster's request slots busy on average.
    rate = utilization * replicas * max_ongoing
    arrivals = np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, size=requests))
    fleet = [_Replica(pool) for _ in range(replicas)]
    holders: dict[int, set[int]] = {}  # model -> replicas holding it (what replicas report to the router)
    finishing: list[tuple[float, int]] = []  # (time, replica)
    waiting: deque[tuple[float, int]] = deque()  # (arrival time, model)
    hits = waits = 0
    waited = 0.0

    def pick(candidates: list[int]) -> int | None:
        drawn = rng.sample(candidates, 2) if len(candidates) > 1 else candidates
        open_ = [r for r in drawn if fleet[r].ongoing < max_ongoing]
        return min(open_, key=lambda r: (fleet[r].ongoing, rng.random())) if open_ else None

    def route(model: int) -> int | None:
        if routing == "multiplexed":
            held = list(holders.get(model, ()))
            chosen = pick(held) if held else None
            if chosen is None:
                fewest = min(len(r.models) for r in fleet)
                chosen = pick([i for i, r in enumerate(fleet) if len(r.models) == fewest])
            return chosen
        return pick(range_all)

    def start(replica: int, model: int, now: float) -> None:
        nonlocal hits
        r = fleet[replica]
        before = set(r.models)
        hits += r.use(model)
        for gone in before - set(r.models):
            holders[gone].discard(replica)
        holders.setdefault(model, set()).add(replica)
        r.ongoing += 1
        r.served += 1
        heapq.heappush(finishing, (now + 1.0, replica))

    range_all = list(range(replicas))
    for now, model in zip(arrivals.tolist(), models.tolist()):
        while finishing and finishing[0][0] <= now:
            done_at, replica = heapq.heappop(finishing)
            fleet[replica].ongoing -= 1
            while waiting:  # a slot freed: the oldest waiting request is routed again
                chosen = route(waiting[0][1])
                if chosen is None:
                    break
                arrived, waiting_model = waiting.popleft()
                waited += done_at - arrived
                start(chosen, waiting_model, done_at)
        chosen = route(model) if not waiting else None
        if chosen is None:
            waiting.append((now, model))
            waits += 1
        else:
            start(chosen, model, now)
    served = np.array([r.served for r in fleet], dtype=float)
    return SimResult(routing, hits / max(1, served.sum()), served.max() / served.mean(), served.max() / served.sum(),
                     waited / requests)


def report(adapters: int = 10_000, replicas: int = 64, pools: tuple[int, ...] = (8, 32), max_ongoing: int = 8,
           zipf_s: float = 1.1, requests: int = 200_000) -> list[str]:
    lines = [f"simulation: {adapters:,} adapters (Zipf s={zipf_s}), {replicas} replicas, max_ongoing_requests "
             f"{max_ongoing}, {requests:,} requests at 80% of the cluster's slots",
             f"{'pool':>4} {'routing':<12} {'hit ratio':>9} {'bound':>6} {'imbalance':>9} {'busiest':>8} {'wait':>6}"]
    weights = zipf_weights(adapters, zipf_s)
    for pool in pools:
        bound = weights[:replicas * pool].sum()
        for routing in ("multiplexed", "default"):
            r = simulate(adapters, replicas, pool, max_ongoing, routing, zipf_s=zipf_s, requests=requests)
            lines.append(f"{pool:>4} {routing:<12} {r.hit_ratio:>9.3f} {bound:>6.3f} {r.imbalance:>8.2f}x "
                         f"{r.busiest_share:>7.1%} {r.mean_wait:>6.3f}")
    lines.append(f"(bound: the traffic share of the replicas x pool most popular adapters, the hit ratio of a perfect "
                 f"partition; imbalance: the busiest replica's requests / the mean; busiest: its share, "
                 f"1/{replicas} = {1 / replicas:.1%} when even; wait: mean time a request waited for a slot, in "
                 f"service times)")
    return lines
