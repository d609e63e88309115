"""The paged KV cache: attention over its blocks equals the contiguous cache (its twin, kept for these tests)
in fp32 within 1e-5, with prompts of different lengths, decoding across block boundaries, rows that leave and
come back, and a different adapter per row; the block allocator's bookkeeping; the budget in bytes."""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.errors import CapacityError, ConfigError
from adapterhub.runtime import generate as gen
from adapterhub.runtime.base import Base
from adapterhub.runtime.model.kv_cache import ContiguousKVCache, KVCache
from adapterhub.runtime.model.tiny import byte_tokenizer
from model_fixtures import family_config, fp32_model

ATOL = 1e-5
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base(family: str) -> Base:
    model, weights = fp32_model(family)
    base = Base(family_config(family), byte_tokenizer(), model, max_adapters=4)
    shapes = base.module_shapes()
    dense = {n.removesuffix(".weight"): w.numpy() for n, w in weights.items() if n.removesuffix(".weight") in shapes}
    base.add_adapter(random_adapter(shapes, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1), "lora")
    base.add_adapter(random_adapter(shapes, r=8, lora_alpha=16, target_modules=ALL_LINEARS, use_dora=True, seed=2,
                                    base_weights=dense), "dora")
    return base


def _caches(base: Base, max_batch: int, max_seq: int, num_blocks: int, block_size: int):
    c, dtype = base.config, base.model.dtype
    shape = (c.num_hidden_layers, max_batch, c.num_key_value_heads, max_seq, c.head_dim)
    return (KVCache(*shape, dtype=dtype, num_blocks=num_blocks, block_size=block_size),
            ContiguousKVCache(*shape, dtype=dtype))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_paged_attention_equals_contiguous(family):
    """Rows of 5, 1 and 11 tokens prefilled into scattered rows, decoded 13 steps with blocks of 4 tokens (every row
    crosses several block boundaries; blocks interleave between rows), one row freed and refilled mid-way; each
    row has its own adapter (LoRA, DoRA on all linears, none). Every step's logits equal the contiguous cache's."""
    base = _base(family)
    paged, contiguous = _caches(base, max_batch=4, max_seq=32, num_blocks=24, block_size=4)
    rows, names = [2, 0, 3], ["lora", None, "dora"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 259, (n,), generator=g).tolist() for n in (5, 1, 11)]
    with torch.inference_mode():
        ids = base.pool.acquire(names)
        step = lambda cache, r, t, i: gen.decode(base.model, cache, torch.tensor(r), t, i)  # noqa: E731
        got, want = (gen.prefill(base.model, cache, rows, prompts, ids) for cache in (paged, contiguous))
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        plain = gen.prefill(base.model, ContiguousKVCache(*_shape(base, 4, 32), dtype=torch.float32), rows, prompts, None)
        assert (got - plain).abs().amax(-1)[[0, 2]].min() > 1e-3  # the adapters change their rows
        for i in range(13):
            tokens = want.argmax(-1)
            got, want = step(paged, rows, tokens, ids), step(contiguous, rows, tokens, ids)
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            if i == 6:  # row 0 (the 1-token prompt) leaves; a new 6-token prompt takes its row, base only
                for cache in (paged, contiguous):
                    cache.free([0])
                fresh = torch.randint(0, 259, (6,), generator=g).tolist()
                first = [gen.prefill(base.model, cache, [0], [fresh], ids[1:2]) for cache in (paged, contiguous)]
                torch.testing.assert_close(first[0], first[1], rtol=0, atol=ATOL)
                want = torch.cat([want[:1], first[1], want[2:]])  # row 0's next input is the new prompt's token
        base.pool.release(ids)
    assert paged.lengths.tolist() == contiguous.lengths.tolist() == [6 + 6, 0, 5 + 13, 11 + 13]
    tables = [paged.tables[r, : paged.blocks_for(int(paged.lengths[r]))].tolist() for r in (2, 3)]
    assert any(b - a != 1 for t in tables for a, b in zip(t, t[1:]))  # blocks interleave: the gather is exercised
    assert paged.free_blocks == 24 - sum(paged.blocks_for(n) for n in paged.lengths.tolist())


def _shape(base: Base, max_batch: int, max_seq: int):
    c = base.config
    return c.num_hidden_layers, max_batch, c.num_key_value_heads, max_seq, c.head_dim


def test_generate_on_the_paged_cache_equals_recomputation():
    """`generate` (paged, sized to the batch) gives the tokens that recomputing the whole sequence gives."""
    base = _base("llama")
    prompts = [[5, 9, 200, 17, 3], [44], list(range(30, 48))]
    out = base.generate(prompts, adapters=["dora", None, "lora"], max_new_tokens=9)
    for p, name, completion in zip(prompts, ["dora", None, "lora"], out):
        seq = list(p)
        for _ in range(len(completion.token_ids)):
            seq.append(int(base(torch.tensor([seq]), adapters=[name])[0, -1].argmax()))
        assert completion.token_ids == seq[len(p):]


def test_block_allocation_is_all_or_nothing_and_freed_blocks_are_reused():
    base = _base("llama")
    cache, _ = _caches(base, max_batch=3, max_seq=16, num_blocks=5, block_size=4)
    cache.allocate([0, 1], [5, 4])  # 2 + 1 blocks
    assert cache.free_blocks == 2 and cache.tables[0, :2].tolist() == [1, 2] and cache.tables[1, 0] == 3
    assert cache.blocks_to_grow([0, 1, 2], [9, 4, 8]) == 3
    with pytest.raises(CapacityError, match="2 free blocks .* needs 3"):
        cache.allocate([0, 2], [9, 8])
    assert cache.free_blocks == 2 and cache.tables[2].tolist() == [0, 0, 0, 0]  # nothing taken
    cache.free([0])
    assert cache.free_blocks == 4 and cache.tables[0].tolist() == [0, 0, 0, 0]
    cache.allocate([2], [16])  # the whole row: the freed blocks come back (lowest first)
    assert sorted(cache.tables[2].tolist()) == [1, 2, 4, 5] and cache.free_blocks == 0
    with pytest.raises(CapacityError, match="max_seq=16"):
        cache.allocate([1], [17])


def test_new_cache_holds_the_budget_in_blocks():
    """memory // (block_size x bytes per token) blocks, bytes per token = 2 (k, v) x L x Hkv x Dh x itemsize."""
    base = _base("llama")
    c = family_config("llama")
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # fp32
    assert base.kv_bytes_per_token() == per_token
    cache = base.new_cache(max_batch=8, max_seq=40, memory=10 * 16 * per_token + 5)
    assert cache.num_blocks == 10 and cache.block_size == 16
    assert cache.nbytes == 11 * 16 * per_token  # the budget plus the padding block
    assert base.new_cache(max_batch=2, max_seq=40).num_blocks == 2 * 3  # no budget: every row at max_seq
    with pytest.raises(ConfigError, match="less than one request of max_seq=40"):
        base.new_cache(max_batch=8, max_seq=40, memory=2 * 16 * per_token)
