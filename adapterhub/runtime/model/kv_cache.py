"""`KVCache`: preallocated keys and values indexed by cache row, each row with its own length.

Continuous batching needs rows that start and finish at different times (docs/runtime.md, step API),
so a forward names the cache rows it runs on and every row has its own position. The lengths live on
the host (a CPU tensor): the caller already knows them (prompt lengths, one token per decode), so
positions and the attended key span are computed without reading anything back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheStep:
    """Where one forward of T new tokens for B rows reads and writes the cache."""

    rows: torch.Tensor  # (B,) cache rows, on the cache's device
    row_slice: slice | None  # the same rows as a slice when they are consecutive (no gather needed)
    positions: torch.Tensor  # (B, T) absolute position of each new token, on the cache's device
    span: int  # keys 0..span-1 are read; every row's new positions are < span


class KVCache:
    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 *, dtype: torch.dtype, device="cpu"):
        shape = (n_layers, max_batch, n_kv_heads, max_seq, head_dim)  # (L, Bmax, Hkv, S, Dh)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # (Bmax,) host: tokens held per row
        self.max_batch, self.max_seq = max_batch, max_seq

    def free(self, rows) -> None:
        """Forgets rows; their stale keys are never read (attention stops at each row's length)."""
        self.lengths[torch.as_tensor(rows, dtype=torch.long).cpu()] = 0

    def step(self, rows, T: int, starts: torch.Tensor | None = None) -> CacheStep:
        """Plans a forward of T tokens per row starting at `starts` (B,) (default: each row's length)."""
        rows_host = torch.as_tensor(rows, dtype=torch.long).cpu()  # (B,)
        starts = self.lengths[rows_host] if starts is None else starts  # (B,)
        positions = starts[:, None] + torch.arange(T)  # (B, T)
        first, B = int(rows_host[0]), rows_host.numel()
        is_consecutive = bool((rows_host == torch.arange(first, first + B)).all())
        device = self.k.device
        return CacheStep(
            rows=rows_host.to(device, non_blocking=True),
            row_slice=slice(first, first + B) if is_consecutive else None,
            positions=positions.to(device, non_blocking=True),
            span=int(starts.max()) + T,
        )

    def update(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor):
        """Writes new keys/values (B, Hkv, T, Dh); returns this layer's keys/values (B, Hkv, span, Dh)."""
        kl, vl = self.k[layer], self.v[layer]  # (Bmax, Hkv, S, Dh)
        index = (step.rows[:, None], slice(None), step.positions)  # selects (B, T, Hkv, Dh)
        kl[index] = k.transpose(1, 2)
        vl[index] = v.transpose(1, 2)
        if step.row_slice is not None:
            return kl[step.row_slice, :, : step.span], vl[step.row_slice, :, : step.span]
        return kl[step.rows, :, : step.span], vl[step.rows, :, : step.span]
