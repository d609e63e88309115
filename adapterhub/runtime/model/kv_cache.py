"""KV caches indexed by cache row, each row with its own length: `KVCache` (paged, the one that runs) and
`ContiguousKVCache` (one `(S, Dh)` strip per row and head: the twin the paged one is tested against).

Continuous batching needs rows that start and finish at different times (docs/runtime.md, step API),
so a forward names the cache rows it runs on and every row has its own position. The lengths live on
the host (a CPU tensor): the caller already knows them (prompt lengths, one token per decode), so
positions and the attended key span are computed without reading anything back from the device.

Paging: a preallocated `max_batch x max_seq` cache holds memory for every row at full length whatever the
rows hold (16 x 4096 tokens of a 135M Llama were 1.9 GiB in bf16, idle). `KVCache` instead holds a fixed
number of blocks of `block_size` tokens (the budget) and gives them to rows as tokens arrive; a block table
per row maps position p to block `tables[row, p // block_size]`, slot `p % block_size`. Block 0 is never
given out: table entries of positions a row does not hold point at it, so the right padding of a batched
prefill writes there, and reads of it are masked (keys past a row's length, as in the contiguous cache).
Attention on the torch layers reads a row's blocks in order, gathered into `(B, Hkv, span, Dh)` (`update`): the
same values at the same key indices as the contiguous cache, so the scores and the softmax are those of the
contiguous path. A decode step on the fused ops (model/layers.py `decode`) writes and reads them in place.
Storage starts as zeros so masked keys are finite (a NaN key would poison a row's softmax even when masked).
Blocks are reference-counted (model/prefix_cache.py): rows that start with the same full blocks of a prompt under
the same adapter can hold the same blocks (`share_prefix`, `register_prefix`), and a freed block that has a
content key stays cached until a new block is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterhub.errors import CapacityError, ConfigError, RequestError
from adapterhub.runtime.model.prefix_cache import BlockPool, block_keys

BLOCK_SIZE = 16  # tokens per block: a row wastes under one block; the tables stay small (max_seq / 16 entries)


@dataclass(frozen=True)
class CacheStep:
    """Where one forward of T new tokens for B rows reads and writes the cache."""

    rows: torch.Tensor  # (B,) cache rows, on the cache's device
    positions: torch.Tensor  # (B, T) absolute position of each new token, on the cache's device
    span: int  # keys 0..span-1 are read; every row's new positions are < span
    row_slice: slice | None = None  # contiguous cache: the rows as a slice when consecutive (no gather)
    blocks: torch.Tensor | None = None  # paged: (B, T) block each new token is written to
    offsets: torch.Tensor | None = None  # paged: (B, T) its slot in that block
    tables: torch.Tensor | None = None  # paged: (B, ceil(span / block_size)) blocks read, in position order


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token takes in every layer."""
    return 2 * n_layers * n_kv_heads * head_dim * dtype.itemsize


class KVCache:
    """Paged keys and values: (L, Hkv, 1 + num_blocks, block_size, Dh) each, block 0 the padding sink.

    num_blocks None: enough for every row at max_seq (the contiguous cache's capacity)."""

    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 *, dtype: torch.dtype, device="cpu", num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        if block_size < 1 or max_batch < 1 or max_seq < 1:
            raise ConfigError(f"a KV cache needs block_size, max_batch and max_seq >= 1; got {block_size}, "
                              f"{max_batch}, {max_seq}")
        self.block_size, self.max_batch, self.max_seq = block_size, max_batch, max_seq
        self.blocks_per_row = math.ceil(max_seq / block_size)
        self.num_blocks = max_batch * self.blocks_per_row if num_blocks is None else int(num_blocks)
        if self.num_blocks < 1:
            raise ConfigError(f"a KV cache needs at least one block of {block_size} tokens; got {num_blocks}")
        shape = (n_layers, n_kv_heads, 1 + self.num_blocks, block_size, head_dim)  # (L, Hkv, 1+NB, bs, Dh)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # (Bmax,) host: tokens held per row
        self.tables = torch.zeros(max_batch, self.blocks_per_row, dtype=torch.long)  # host; 0: not held
        self._held = [0] * max_batch  # blocks each row holds (tables[row, :held])
        self.pool = BlockPool(self.num_blocks)  # free, held (reference-counted) and cached blocks
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache (`share_prefix`)
        self.prefix_hits = 0  # of those, tokens found cached (not recomputed)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value storage (the budget, plus the padding block)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def free_blocks(self) -> int:
        """Blocks `allocate` can hand out: free, or cached without a row holding them (evicted on demand)."""
        return self.pool.available

    def blocks_for(self, tokens: int) -> int:
        """Blocks a row of `tokens` tokens holds."""
        return -(-int(tokens) // self.block_size)

    def blocks_to_grow(self, rows, totals) -> int:
        """New blocks `allocate(rows, totals)` would take."""
        return sum(max(0, self.blocks_for(t) - self._held[r]) for r, t in zip(_ints(rows), _ints(totals)))

    def allocate(self, rows, totals) -> None:
        """Gives each row blocks for positions 0..totals[i]-1 (keeping those it holds); all or nothing.
        Raises CapacityError when the free blocks do not suffice (the serving engine preempts before)."""
        rows, totals = _ints(rows), _ints(totals)
        if max(totals, default=0) > self.max_seq:
            raise CapacityError(f"a row of {max(totals)} tokens does not fit this cache's max_seq={self.max_seq}")
        need = self.blocks_to_grow(rows, totals)
        if need > self.free_blocks:
            raise CapacityError(f"the KV cache has {self.free_blocks} free blocks of {self.block_size} tokens and "
                                f"this step needs {need}; free rows, or give the cache more memory")
        for r, t in zip(rows, totals):
            while self._held[r] < self.blocks_for(t):
                self.tables[r, self._held[r]] = self.pool.take()
                self._held[r] += 1

    def free(self, rows) -> None:
        """Forgets rows and releases their blocks, last first (their stale values are never read unmasked;
        registered blocks stay cached, model/prefix_cache.py)."""
        for r in _ints(rows):
            for block in reversed(self.tables[r, : self._held[r]].tolist()):
                self.pool.release(block)
            self.tables[r], self._held[r], self.lengths[r] = 0, 0, 0

    def share_prefix(self, row: int, adapter: str, tokens) -> int:
        """Maps the longest cached run of `tokens`' full blocks under `adapter` into `row`'s table (the row holds
        nothing) and returns how many tokens it covers: at most `(len(tokens) - 1) // block_size` blocks, so the
        last token is always computed (its logits are the next token's) and the row never writes a shared block."""
        if self._held[row]:
            raise RequestError(f"cache row {row} holds {self._held[row]} blocks; free it before sharing a prefix")
        blocks = self._cached_run(adapter, tokens)
        for i, block in enumerate(blocks):
            self.pool.share(block)
            self.tables[row, i] = block
        self._held[row] = len(blocks)
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(blocks) * self.block_size
        return len(blocks) * self.block_size

    def cached_prefix(self, adapter: str, tokens) -> int:
        """Tokens of `tokens` that `share_prefix` would find cached now (nothing is taken or counted)."""
        return len(self._cached_run(adapter, tokens)) * self.block_size

    def _cached_run(self, adapter: str, tokens) -> list[int]:
        usable = (len(tokens) - 1) // self.block_size * self.block_size  # the last token is always computed
        return self.pool.lookup(block_keys(adapter, tokens[:usable], self.block_size))

    def blocks_to_start(self, prompts) -> int:
        """Blocks that rows starting now with `prompts` [(adapter, tokens, total)] take from `free_blocks` to hold
        `total` tokens each, `share_prefix` done first: less each prompt's cached run, plus the cached blocks of
        those runs that no row holds (sharing takes them out of the available ones), each counted once."""
        need, revived = 0, set()
        for adapter, tokens, total in prompts:
            blocks = self._cached_run(adapter, tokens)
            need += self.blocks_for(total) - len(blocks)
            revived.update(b for b in blocks if self.pool.is_evictable(b))
        return need + len(revived)

    def register_prefix(self, row: int, adapter: str, tokens) -> None:
        """Names the row's full blocks of `tokens` (written: positions 0..len-1 hold them) by their content, so
        later rows can share them (`share_prefix`); blocks named already keep their names."""
        for i, key in enumerate(block_keys(adapter, tokens, self.block_size)[: self._held[row]]):
            self.pool.register(int(self.tables[row, i]), key)

    def step(self, rows, T: int, starts: torch.Tensor | None = None) -> CacheStep:
        """Plans a forward of T tokens per row starting at `starts` (B,) (default: each row's length).
        Positions the rows do not hold (`allocate` first) write to the padding block."""
        rows_host = torch.as_tensor(rows, dtype=torch.long).cpu()  # (B,)
        starts = self.lengths[rows_host] if starts is None else starts  # (B,)
        positions = starts[:, None] + torch.arange(T)  # (B, T)
        span = int(starts.max()) + T
        tables = self.tables[rows_host, : self.blocks_for(span)]  # (B, nb)
        if tables.shape[1] < self.blocks_for(span):  # a batch of different starts: right padding past max_seq
            tables = torch.nn.functional.pad(tables, (0, self.blocks_for(span) - tables.shape[1]))  # to block 0
        blocks = tables.gather(1, positions // self.block_size)  # (B, T)
        device = self.k.device
        to = dict(device=device, non_blocking=True)
        return CacheStep(rows=rows_host.to(**to), positions=positions.to(**to), span=span,
                         blocks=blocks.to(**to), offsets=(positions % self.block_size).to(**to), tables=tables.to(**to))

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        """Writes new keys/values (B, Hkv, T, Dh); returns this layer's keys/values (B, Hkv, span, Dh)."""
        B, Hkv, _, Dh = k.shape
        out = []
        for store, new in ((self.k[layer], k), (self.v[layer], v)):  # (Hkv, 1+NB, bs, Dh)
            store[:, step.blocks, step.offsets] = new.transpose(0, 1)  # (Hkv, B, T, Dh)
            nb = step.tables.shape[1]
            gathered = store.index_select(1, step.tables.reshape(-1))  # (Hkv, B*nb, bs, Dh)
            out.append(gathered.view(Hkv, B, nb * self.block_size, Dh).transpose(0, 1)[:, :, : step.span])
        return out[0], out[1]


class ContiguousKVCache:
    """Preallocated (L, Bmax, Hkv, S, Dh) keys and values: the paged cache's twin in tests."""

    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 *, dtype: torch.dtype, device="cpu"):
        shape = (n_layers, max_batch, n_kv_heads, max_seq, head_dim)  # (L, Bmax, Hkv, S, Dh)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # (Bmax,) host: tokens held per row
        self.max_batch, self.max_seq = max_batch, max_seq

    def allocate(self, rows, totals) -> None:
        if max(_ints(totals), default=0) > self.max_seq:
            raise CapacityError(f"a row of {max(_ints(totals))} tokens does not fit this cache's max_seq={self.max_seq}")

    def free(self, rows) -> None:
        """Forgets rows; their stale keys are never read (attention stops at each row's length)."""
        self.lengths[torch.as_tensor(rows, dtype=torch.long).cpu()] = 0

    def step(self, rows, T: int, starts: torch.Tensor | None = None) -> CacheStep:
        rows_host = torch.as_tensor(rows, dtype=torch.long).cpu()  # (B,)
        starts = self.lengths[rows_host] if starts is None else starts  # (B,)
        positions = starts[:, None] + torch.arange(T)  # (B, T)
        first, B = int(rows_host[0]), rows_host.numel()
        is_consecutive = bool((rows_host == torch.arange(first, first + B)).all())
        device = self.k.device
        return CacheStep(rows=rows_host.to(device, non_blocking=True), positions=positions.to(device, non_blocking=True),
                         span=int(starts.max()) + T, row_slice=slice(first, first + B) if is_consecutive else None)

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        kl, vl = self.k[layer], self.v[layer]  # (Bmax, Hkv, S, Dh)
        index = (step.rows[:, None], slice(None), step.positions)  # selects (B, T, Hkv, Dh)
        kl[index] = k.transpose(1, 2)
        vl[index] = v.transpose(1, 2)
        if step.row_slice is not None:
            return kl[step.row_slice, :, : step.span], vl[step.row_slice, :, : step.span]
        return kl[step.rows, :, : step.span], vl[step.rows, :, : step.span]


def _ints(values) -> list[int]:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1).tolist()
