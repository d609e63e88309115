"""Prefix caching in the paged KV cache (runtime/model/prefix_cache.py, KVCache.share_prefix / register_prefix):
shared blocks are the same block ids, reference counts, LRU eviction, adapter identity in the keys, partial blocks
never shared, freed blocks reusable, allocation under pressure evicting; and on the tiny model in fp32, a prefill
that starts from cached blocks computes only the suffix and gives the logits of a full prefill."""

from __future__ import annotations

import pytest
import torch

from adapterhub.errors import CapacityError
from adapterhub.runtime import load_base
from adapterhub.runtime.model.kv_cache import KVCache
from adapterhub.runtime.model.prefix_cache import block_keys

BS = 16


def _cache(num_blocks: int, max_batch: int = 4) -> KVCache:
    return KVCache(1, max_batch, 1, 128, 4, dtype=torch.float32, num_blocks=num_blocks)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _admit(cache: KVCache, row: int, tokens: list[int], adapter: str = "") -> int:
    """What generate.prefill does around the forward: share, allocate, (compute), register."""
    hit = cache.share_prefix(row, adapter, tokens)
    cache.allocate([row], [len(tokens)])
    cache.lengths[row] = len(tokens)
    cache.register_prefix(row, adapter, tokens)
    return hit


def test_keys_chain_every_token_before_and_the_adapter():
    a = _prompt(0, 50)
    keys = block_keys("", a, BS)
    assert len(keys) == 3  # 48 of 50 tokens in full blocks; the partial last block has no key
    b = a[:20] + [(a[20] + 1) % 250] + a[21:]  # one token of the second block changed
    other = block_keys("", b, BS)
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] != keys[2]  # the chain carries the change on
    assert block_keys("sha256:" + "ab" * 32, a, BS)[0] != keys[0]
    assert len(set(keys)) == 3


def test_shared_blocks_are_referenced_not_copied():
    cache = _cache(12)
    shared = _prompt(1, 40)
    first, second = shared + _prompt(2, 8), shared + _prompt(3, 9)  # 48 and 49 tokens, 40 in common
    assert _admit(cache, 0, first) == 0
    assert cache.blocks_to_start([("", second, 50)]) == 4 - 2  # admission: the two shared blocks are held already
    assert _admit(cache, 1, second) == 32  # the two full blocks of the common 40 tokens
    assert cache.tables[1, :2].tolist() == cache.tables[0, :2].tolist()  # the same block ids
    assert cache.tables[1, 2] != cache.tables[0, 2]  # the third block differs (tokens 32..47 differ)
    assert [cache.pool.refs(int(b)) for b in cache.tables[0, :3]] == [2, 2, 1]
    assert cache.free_blocks == 12 - 3 - 2  # row 1 took two blocks of its own (positions 32..48)
    assert (cache.prefix_queries, cache.prefix_hits) == (48 + 49, 32)


def test_refcounts_and_freed_blocks_stay_reusable():
    cache = _cache(12)
    prompt = _prompt(4, 40)
    _admit(cache, 0, prompt)
    _admit(cache, 1, prompt)
    blocks = cache.tables[0, :3].tolist()
    cache.free([0])
    assert [cache.pool.refs(b) for b in blocks[:2]] == [1, 1] and not cache.pool.is_evictable(blocks[0])
    cache.free([1])
    assert [cache.pool.refs(b) for b in blocks[:2]] == [0, 0]
    assert cache.pool.is_evictable(blocks[0]) and cache.pool.is_evictable(blocks[1])
    assert not cache.pool.is_evictable(blocks[2])  # the partial block (tokens 32..39) was never registered
    assert cache.free_blocks == 12  # cached blocks count as available
    # Two rows starting with it: one new block each, and the two cached blocks they revive, counted once.
    assert cache.blocks_to_start([("", prompt, 41), ("", prompt, 41)]) == 1 + 1 + 2
    assert _admit(cache, 2, prompt) == 32  # found again after every row let go
    assert cache.tables[2, :2].tolist() == blocks[:2]


def test_the_last_token_is_always_computed_and_a_partial_block_never_shared():
    cache = _cache(12)
    exact = _prompt(5, 32)  # two full blocks
    _admit(cache, 0, exact)
    assert cache.pool.cached == 2
    assert _admit(cache, 1, exact) == 16  # (32 - 1) // 16 blocks: the 32nd token is recomputed in a row's own block
    assert cache.tables[1, 1] != cache.tables[0, 1]
    partial = _prompt(6, 20)
    _admit(cache, 2, partial)
    assert cache.pool.cached == 3  # one full block of 20 tokens, the partial one unnamed
    assert _admit(cache, 3, partial + _prompt(7, 30)) == 16  # only the full block: tokens 16..19 are recomputed


def test_another_adapter_misses():
    cache = _cache(12)
    prompt = _prompt(8, 40)
    _admit(cache, 0, prompt, adapter="sha256:" + "11" * 32)
    assert _admit(cache, 1, prompt, adapter="") == 0
    assert _admit(cache, 2, prompt, adapter="sha256:" + "22" * 32) == 0
    assert _admit(cache, 3, prompt, adapter="sha256:" + "11" * 32) == 32


def test_eviction_takes_the_least_recently_released_block_tail_first():
    cache = _cache(6, max_batch=3)
    a, b = _prompt(9, 33), _prompt(10, 33)  # 3 blocks each: 2 full (registered) + 1 partial
    _admit(cache, 0, a)
    _admit(cache, 1, b)
    a_blocks, b_blocks = cache.tables[0, :2].tolist(), cache.tables[1, :2].tolist()
    cache.free([0])  # a released first: least recently used
    cache.free([1])
    assert cache.pool.available == 6 and cache.pool.cached == 4
    cache.allocate([2], [16 * 3])  # 3 blocks: the 2 free ones, then a's tail block (its head stays)
    assert a_blocks[1] in cache.tables[2, :3].tolist() and a_blocks[0] not in cache.tables[2, :3].tolist()
    assert cache.pool.cached == 3
    assert cache.pool.lookup(block_keys("", a, BS)) == a_blocks[:1]  # the chain now ends after its head
    assert cache.pool.lookup(block_keys("", b, BS)) == b_blocks
    cache.free([2])
    assert _admit(cache, 0, b) == 32  # b untouched; sharing it makes its blocks held, not evictable
    assert not cache.pool.is_evictable(b_blocks[0])


def test_allocation_under_pressure_evicts_rather_than_fails():
    cache = _cache(4, max_batch=2)
    _admit(cache, 0, _prompt(11, 64))  # every block held, all four registered
    cache.free([0])
    assert cache.pool.available == 4 and cache.pool.cached == 4
    cache.allocate([1], [64])  # no free block: every one evicted, oldest released (the tail) first
    assert cache.pool.cached == 0 and cache.free_blocks == 0
    with pytest.raises(CapacityError, match="free blocks"):
        cache.allocate([0], [1])  # now held by a row: nothing to evict


def test_a_prefill_from_cached_blocks_computes_only_the_suffix_with_the_same_logits():
    """fp32 tiny model: a 40-token shared prefix, then prompts of 48 tokens; the second prefill runs 16 tokens
    (two blocks cached) and its last-token logits equal a full prefill's; the same holds for a batch of rows
    with different starts (the right padding of the shorter suffix writes only the padding block)."""
    base = load_base("tiny", compute_dtype=torch.float32)
    shared = _prompt(12, 40)
    first, second, third = shared + _prompt(13, 8), shared + _prompt(14, 8), _prompt(15, 30)
    seen = []
    hook = base.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        plain = base.new_cache(3, 128)
        expected = base.prefill(plain, [0, 1, 2], [first, second, third], None)  # (3, V)
        cache = base.new_cache(3, 128)
        base.prefill(cache, [0], [first], None, prefix_adapters=[""])
        got = base.prefill(cache, [1, 2], [second, third], None, prefix_adapters=["", ""])
    finally:
        hook.remove()
    assert seen == [(3, 48), (1, 48), (2, 30)]  # second: 16 uncached tokens, padded to third's 30
    assert (cache.prefix_queries, cache.prefix_hits) == (48 + 48 + 30, 32)
    torch.testing.assert_close(got, expected[1:], atol=1e-5, rtol=0)
    shared_blocks = cache.tables[0, :2].tolist()
    assert [cache.pool.refs(b) for b in shared_blocks] == [2, 2]
    # A retried prefill (the engine retries a failed batch row by row) starts its row clean: no reference twice.
    again = base.prefill(cache, [1], [second], None, prefix_adapters=[""])
    assert [cache.pool.refs(b) for b in shared_blocks] == [2, 2] and cache.tables[1, :2].tolist() == shared_blocks
    torch.testing.assert_close(again, expected[1:2], atol=1e-5, rtol=0)
    # Decoding on goes on from the shared blocks: the next step's logits match too.
    token = expected[1:].argmax(-1)
    nxt = base.decode(cache, torch.tensor([1, 2]), token, None)
    ref = base.decode(plain, torch.tensor([1, 2]), token, None)
    torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=0)


def test_a_one_token_suffix_runs_as_a_decode_step_with_the_same_logits():
    """A 33-token prompt seen before: 32 tokens cached, so the prefill is one token per row, which the model runs
    on the decode step's fused path where the compiled kernels run; fp32 logits within the decode twins' 1e-4."""
    base = load_base("tiny", compute_dtype=torch.float32)
    prompt = _prompt(16, 33)
    plain = base.new_cache(2, 64)
    expected = base.prefill(plain, [0], [prompt], None)
    cache = base.new_cache(2, 64)
    base.prefill(cache, [0], [prompt], None, prefix_adapters=[""])
    seen = []
    hook = base.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        got = base.prefill(cache, [1], [prompt], None, prefix_adapters=[""])
    finally:
        hook.remove()
    assert seen == [(1, 1)] and cache.prefix_hits == 32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert int(got.argmax()) == int(expected.argmax())
