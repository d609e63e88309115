"""The routing simulation of bench/scaleout_sim.py (no Ray): its policy behaves as the model says on cases
with a known answer."""

from __future__ import annotations

import pytest

from bench.scaleout_sim import simulate, zipf_weights


def test_one_replica_makes_routing_irrelevant():
    runs = [simulate(200, 1, 16, 8, routing, requests=5000) for routing in ("multiplexed", "default")]
    assert runs[0].hit_ratio == runs[1].hit_ratio
    assert runs[0].imbalance == runs[1].imbalance == 1.0


def test_pools_that_hold_every_adapter_miss_each_adapter_once_with_affinity():
    # 8 replicas x 16 slots hold all 64 adapters: affinity loads each one once (+ copies of hot adapters when
    # their holders are full), while default routing loads each adapter on nearly every replica.
    result = simulate(64, 8, 16, 8, "multiplexed", requests=20_000, utilization=0.3)
    default = simulate(64, 8, 16, 8, "default", requests=20_000, utilization=0.3)
    assert result.hit_ratio > 0.99
    assert default.hit_ratio < result.hit_ratio


def test_affinity_beats_default_routing_and_stays_under_the_partition_bound():
    adapters, replicas, pool = 2000, 16, 8
    bound = zipf_weights(adapters, 1.1)[:replicas * pool].sum()
    multiplexed = simulate(adapters, replicas, pool, 8, "multiplexed", requests=30_000)
    default = simulate(adapters, replicas, pool, 8, "default", requests=30_000)
    assert default.hit_ratio < multiplexed.hit_ratio <= bound + 0.01
    assert multiplexed.imbalance < 1.2  # capacity limits spill a hot adapter's load onto other replicas


def test_zipf_weights_sum_to_one_and_fall():
    weights = zipf_weights(100, 1.1)
    assert weights.sum() == pytest.approx(1.0)
    assert all(weights[:-1] > weights[1:])
    assert weights[0] / weights[9] == pytest.approx(10**1.1)
