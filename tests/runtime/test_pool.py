"""AdapterPool: slots, LRU eviction, pinning, capacity, validation before any stack is touched."""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapter import Adapter, peft_key, random_adapter
from adapterhub.errors import AdapterNotLoadedError, CapacityError, IncompatibleAdapterError
from adapters_fixtures import SHAPES, base_weights, make_layers, make_pool

Q = "model.layers.0.self_attn.q_proj"


def lora(seed: int, r: int = 4, shapes=SHAPES) -> Adapter:
    return random_adapter(shapes, r=r, lora_alpha=2 * r, target_modules=("q_proj", "v_proj"), seed=seed)


@pytest.fixture
def layers():
    return make_layers(base_weights())


def output(layers, name_or_none, pool, x):
    ids = pool.acquire([name_or_none])
    try:
        return layers[Q](x.clone(), ids)
    finally:
        pool.release(ids)


def test_slots_are_lowest_free_and_names_are_listed(layers):
    pool = make_pool(layers, capacity=3)
    assert [pool.add(lora(i), f"a{i}") for i in range(3)] == [1, 2, 3]
    pool.remove("a1")
    assert pool.add(lora(9), "b") == 2
    assert sorted(pool.names()) == ["a0", "a2", "b"] and len(pool) == 3 and "b" in pool


def test_lru_evicts_least_recently_used_and_its_rows_are_cleared(layers):
    pool = make_pool(layers, capacity=2)
    pool.add(lora(1), "a")
    pool.add(lora(2), "b")
    pool.slot("a")  # touch: "b" is now least recently used
    x = torch.randn(1, 2, 64)
    before = output(layers, "a", pool, x)
    slot_b = pool.slot("b")
    pool.slot("a")
    assert pool.add(lora(3), "c") == slot_b
    assert sorted(pool.names()) == ["a", "c"]
    torch.testing.assert_close(output(layers, "a", pool, x), before, atol=0, rtol=0)
    with pytest.raises(AdapterNotLoadedError, match="'b' is not loaded"):
        pool.slot("b")
    # The evicted slot now computes "c", not a mix of "b" and "c".
    fresh = make_pool(make_layers(base_weights()), capacity=1)
    fresh.add(lora(3), "c")
    torch.testing.assert_close(output(layers, "c", pool, x), output(fresh.linears, "c", fresh, x), atol=1e-6, rtol=1e-6)


def test_pinned_slots_are_never_evicted_and_full_pool_raises(layers):
    pool = make_pool(layers, capacity=2)
    pool.add(lora(1), "a")
    pool.add(lora(2), "b")
    ids = pool.acquire(["a", "b", None])
    assert ids.tolist() == [1, 2, 0] and ids.dtype == torch.int64
    with pytest.raises(CapacityError, match="all 2 adapter slots are in use"):
        pool.add(lora(3), "c")
    with pytest.raises(CapacityError, match="in flight"):
        pool.remove("a")
    assert sorted(pool.names()) == ["a", "b"]
    pool.release(ids)
    pool.add(lora(3), "c")  # now "a" (least recently used, unpinned) goes
    assert sorted(pool.names()) == ["b", "c"]


def test_refcounted_pins(layers):
    pool = make_pool(layers, capacity=1)
    pool.add(lora(1), "a")
    first, second = pool.acquire(["a"]), pool.acquire(["a", "a"])
    pool.release(first)
    assert pool.is_pinned("a")
    pool.release(second)
    assert not pool.is_pinned("a")
    with pytest.raises(ValueError, match="released twice"):
        pool.release(second)


def test_unknown_name_in_a_batch_pins_nothing(layers):
    pool = make_pool(layers, capacity=1)
    pool.add(lora(1), "a")
    with pytest.raises(AdapterNotLoadedError, match="add it first"):
        pool.acquire(["a", "nope"])
    assert not pool.is_pinned("a")


def test_unknown_target_module_is_rejected_with_module_and_base_modules(layers):
    pool = make_pool(layers, capacity=2)
    shapes = {**SHAPES, "model.layers.7.self_attn.q_proj": (64, 64)}
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.7\.self_attn\.q_proj.*does not have.*model\.layers\.0"):
        pool.add(lora(1, shapes=shapes), "far")
    assert len(pool) == 0 and all(layer.num_slots == 1 for layer in layers.values())


def test_shape_mismatch_is_rejected_before_any_stack_changes(layers):
    pool = make_pool(layers, capacity=2)
    pool.add(lora(1), "a")
    stacks = {m: {r: g.A.clone() for r, g in layer.rank_groups.items()} for m, layer in layers.items()}
    shapes = dict(SHAPES)
    shapes["model.layers.1.self_attn.v_proj"] = (48, 64)  # base has (32, 64)
    with pytest.raises(IncompatibleAdapterError, match=r"v_proj.*\(48, 64\).*\(32, 64\)"):
        pool.add(lora(2, shapes=shapes), "bad")
    assert pool.names() == ["a"]
    for m, layer in layers.items():
        assert layer.rank_groups.keys() == stacks[m].keys()
        assert all(torch.equal(g.A, stacks[m][r]) for r, g in layer.rank_groups.items())


def test_replacing_a_name_reuses_its_slot_and_ranks_are_grouped(layers):
    pool = make_pool(layers, capacity=2)
    pool.add(lora(1, r=4), "a")
    pool.add(lora(2, r=4), "b")
    x = torch.randn(1, 3, 64)
    b_before = output(layers, "b", pool, x)
    assert pool.add(lora(5, r=16), "a") == 1  # a second rank group; "b" keeps its r=4 stacks
    groups = layers[Q].rank_groups
    assert layers[Q].ranks == [4, 16] and set(groups[4].locals) == {2} and set(groups[16].locals) == {1}
    torch.testing.assert_close(output(layers, "b", pool, x), b_before, atol=1e-6, rtol=1e-6)
    alone = make_pool(make_layers(base_weights()), capacity=1)
    alone.add(lora(5, r=16), "a")
    torch.testing.assert_close(output(layers, "a", pool, x), output(alone.linears, "a", alone, x), atol=1e-6, rtol=1e-6)


def test_loading_inside_and_outside_inference_mode_mix(layers):
    """A serving thread may load adapters under torch.inference_mode, a user outside it: both work."""
    pool = make_pool(layers, capacity=2)
    with torch.inference_mode():
        pool.add(lora(1), "a")
    pool.add(lora(2, r=8), "b")
    pool.remove("a")
    with torch.inference_mode():
        pool.add(lora(3), "c")
    x = torch.randn(1, 2, 64)
    alone = make_pool(make_layers(base_weights()), capacity=1)
    alone.add(lora(3), "c")
    torch.testing.assert_close(output(layers, "c", pool, x), output(alone.linears, "c", alone, x), atol=1e-6, rtol=1e-6)
