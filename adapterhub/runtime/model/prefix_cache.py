"""The paged KV cache's blocks: a free list, reference counts, and content keys for prefix caching.

Prefix caching (docs/runtime.md): requests that share the start of a prompt share the blocks holding its keys
and values instead of recomputing them. A full block of a prompt is named by a key that hashes a chain: the
adapter's identity (its digest, "" for the base: a LoRA on k_proj / v_proj changes the keys and values of the
same tokens), the key of the block before it, and its `block_size` token ids. The chain makes a block's key
name every token before it too, which is what its keys and values depend on (causal attention; the positions
follow from the index in the chain). Only full blocks get keys: a partial block is still being written.

A block is referenced by the rows whose tables hold it. When its last reference goes, a block that has a key
stays cached (evictable) instead of becoming free, so a later request can find it; taking a block hands out
a truly free one first, then evicts the least recently released cached one (its key forgotten). Rows release
their blocks last to first, so a row's tail blocks are evicted before its head: a chain is found from its
first block on, and a missing head would make the blocks after it unreachable anyway.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence

from adapterhub.errors import CapacityError


def block_keys(adapter: str, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The keys of the full blocks of `tokens` under `adapter` ("" for the base), in order (module docstring)."""
    keys, parent = [], adapter.encode()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(digest_size=16)  # 128 bits: a collision would silently serve another prompt's keys
        h.update(len(parent).to_bytes(4, "little") + parent)
        h.update(struct.pack(f"<{block_size}i", *tokens[start : start + block_size]))
        parent = h.digest()
        keys.append(parent)
    return keys


class BlockPool:
    """Blocks 1..num_blocks (0 is the cache's padding sink): free, referenced by rows, or cached (evictable)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))  # a stack: the lowest block is handed out first
        self._refs = [0] * (1 + num_blocks)  # rows holding each block
        self._key_of: dict[int, bytes] = {}  # block -> its content key, for the registered blocks
        self._by_key: dict[bytes, int] = {}  # content key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks no row holds, oldest first

    @property
    def available(self) -> int:
        """Blocks a row can take now: the free ones and the cached ones no row holds (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def cached(self) -> int:
        """Registered blocks (held by rows or evictable)."""
        return len(self._key_of)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def take(self) -> int:
        """A block for new tokens, referenced once: a free one, else the least recently released cached one."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        else:
            raise CapacityError(f"the KV cache's {self.num_blocks} blocks are all held by rows; free rows, or give "
                                "the cache more memory")
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more row holds `block` (a cached block found by `lookup`)."""
        if self._refs[block] == 0:
            self._evictable.pop(block)
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """A row lets go of `block`; at no references left it is cached if registered, else free."""
        self._refs[block] -= 1
        if self._refs[block] > 0:
            return
        if block in self._key_of:
            self._evictable[block] = None  # the most recently released: evicted last
        else:
            self._free.append(block)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first (a chain stops at its first miss)."""
        found = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, block: int, key: bytes) -> None:
        """Names a held, fully written block by its content. A key already naming another block (two rows
        computed the same prompt at once) keeps that one; this block stays unnamed and is freed as usual."""
        if key in self._by_key or block in self._key_of:
            return
        self._key_of[block] = key
        self._by_key[key] = block
