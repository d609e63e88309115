"""AdapterPool: names -> slots of the AdapterLinear stacks, with LRU eviction and pinning.

Slot 0 is "no adapter"; adapters get slots 1..capacity (the lowest free one, so the stacks stay as
short as the number of adapters loaded: the decode path computes every slot). A batch in flight pins
its slots (`acquire` ... `release`, refcounted); loading into a full pool evicts the least recently used
*unpinned* adapter, and raises CapacityError when every slot is pinned, so loading and evicting never
change the adapter of a row in flight. Installing writes only the rows of the new slot; stacks grow
(slots, rank) only between forwards. Single-threaded like the forward: the serving engine calls the
pool between steps.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from adapterhub.adapter import Adapter, check_fits
from adapterhub.base_identity import BaseIdentity
from adapterhub.errors import AdapterNotLoadedError, CapacityError, ConfigError, MergeError
from adapterhub.runtime.adapters.linear import AdapterLinear


class AdapterPool:
    def __init__(self, linears: dict[str, AdapterLinear], capacity: int, identity: BaseIdentity | None = None,
                 adapter_dtype: torch.dtype | None = None):
        """identity: the base's (base_identity.py), which every adapter's recorded base is checked against.
        adapter_dtype: where the layers keep adapters (adapters/linear.py); None leaves the layers' own."""
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"adapter pool capacity must be a positive integer, got {capacity!r}")
        self.linears, self.capacity, self.identity = dict(linears), capacity, identity
        if adapter_dtype is not None:
            for linear in self.linears.values():
                linear.set_adapter_dtype(adapter_dtype)
        self._warned: set = set()  # pairs of bases a name-only mismatch was warned about (once each)
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._adapters: dict[str, Adapter] = {}
        self._pins: dict[int, int] = {}  # slot -> number of batches in flight using it
        self.merged = None  # adapters/merge.py's MergedState while an adapter is merged into the base

    # --- queries ----------------------------------------------------------------------------------

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(Dout, Din) of every layer adapters can target, by HF module path."""
        return {name: (m.out_features, m.in_features) for name, m in self.linears.items()}

    def names(self) -> list[str]:
        return list(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def adapter(self, name: str) -> Adapter:
        """The Adapter loaded under `name` (merge and combine read its exact tensors)."""
        self._require(name)
        return self._adapters[name]

    def slot(self, name: str) -> int:
        """The slot of `name`; marks it most recently used."""
        self._require(name)
        self._slots.move_to_end(name)
        return self._slots[name]

    def check(self, adapter: Adapter, name: str, allow_base_mismatch: bool = False) -> dict:
        """adapter.check_fits against these layers and this base's identity; its modules by HF path."""
        return check_fits(adapter, self.module_shapes(), name, self.identity, allow_base_mismatch=allow_base_mismatch,
                          warned=self._warned)

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        return next((m.adapter_dtype for m in self.linears.values()), None)

    def nbytes(self) -> int:
        """Bytes the adapter stacks hold now (they grow as adapters of new ranks or more slots load)."""
        return sum(m.adapter_nbytes for m in self.linears.values())

    def bytes_per_rank(self) -> int:
        """Bytes one adapter adds per unit of rank when it targets every layer: r=16 takes 16 times this."""
        return sum((m.in_features + m.out_features) * m.adapter_dtype.itemsize
                   for m in self.linears.values())

    def is_pinned(self, name: str) -> bool:
        return self._pins.get(self._slots.get(name, -1), 0) > 0

    # --- batches in flight ------------------------------------------------------------------------

    def acquire(self, names: Sequence[str | None]) -> torch.Tensor:
        """Pin the slots of a batch: names[b] (None = base only) -> ids (B,) int64 on the layers' device."""
        if self.merged is not None and any(name is not None for name in names):
            raise MergeError(
                f"adapter {self.merged.name!r} is merged into the base, so a batch cannot name adapters "
                f"(got {sorted({n for n in names if n is not None})}); pass no adapters to use the merged one, "
                "or unmerge() first")
        slots = [0 if name is None else self.slot(name) for name in names]  # raises before pinning anything
        for s in slots:
            if s:
                self._pins[s] = self._pins.get(s, 0) + 1
        return torch.tensor(slots, dtype=torch.int64, device=self._device())

    def release(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Unpin what `acquire` pinned (the same ids, once)."""
        for s in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if s:
                left = self._pins.get(s, 0) - 1
                if left < 0:
                    raise ValueError(f"release of slot {s}, which no batch holds (released twice?)")
                self._pins[s] = left

    # --- loading ----------------------------------------------------------------------------------

    def add(self, adapter: Adapter, name: str, allow_base_mismatch: bool = False) -> int:
        """Validate `adapter` against the layers and the base identity (`check`), then install it under `name`;
        returns its slot. Re-adding a loaded name replaces it in place (it must not be pinned)."""
        if self.merged is not None:
            raise MergeError(f"cannot add adapter {name!r} while {self.merged.name!r} is merged; unmerge() first")
        modules = self.check(adapter, name, allow_base_mismatch)  # before any stack is touched
        if name in self._slots:
            self._check_unpinned(name, "replace")
            slot = self._slots[name]
            self._slots.move_to_end(name)
        else:
            slot = self._free_slot(name)
            self._slots[name] = slot
        for linear in self.linears.values():
            linear.uninstall(slot)
        for module, m in modules.items():
            to = dict(dtype=torch.float32)
            magnitude = None if m.magnitude is None else torch.as_tensor(m.magnitude, **to)
            self.linears[module].install(slot, torch.as_tensor(m.lora_A, **to), torch.as_tensor(m.lora_B, **to), m.scaling, magnitude)
        self._adapters[name] = adapter
        return slot

    def remove(self, name: str) -> None:
        self._require(name)
        self._check_unpinned(name, "remove")
        if self.merged is not None and self.merged.name == name:
            raise MergeError(f"adapter {name!r} is merged into the base; unmerge() before removing it")
        self._evict(name)

    # --- internals --------------------------------------------------------------------------------

    def _free_slot(self, name: str) -> int:
        used = set(self._slots.values())
        free = [s for s in range(1, self.capacity + 1) if s not in used]
        if free:
            return free[0]
        victim = next((n for n, s in self._slots.items() if not self._pins.get(s, 0)), None)
        if victim is None:
            raise CapacityError(
                f"cannot load adapter {name!r}: all {self.capacity} adapter slots are in use by batches in flight "
                f"({', '.join(self._slots)}); retry when a request finishes, or load the base with more max_adapters")
        slot = self._slots[victim]
        self._evict(victim)
        return slot

    def _evict(self, name: str) -> None:
        slot = self._slots.pop(name)
        self._adapters.pop(name)
        self._pins.pop(slot, None)
        for linear in self.linears.values():
            linear.uninstall(slot)

    def _check_unpinned(self, name: str, action: str) -> None:
        if self.is_pinned(name):
            raise CapacityError(
                f"cannot {action} adapter {name!r}: {self._pins[self._slots[name]]} batch(es) in flight use it; "
                "retry when they finish")

    def _require(self, name: str) -> None:
        if name not in self._slots:
            raise AdapterNotLoadedError(
                f"adapter {name!r} is not loaded; loaded: {list(self._slots) or 'none'}; add it first "
                "(base.add_adapter)")

    def _device(self) -> torch.device:
        first = next(iter(self.linears.values()), None)
        return first.device if first is not None else torch.device("cpu")
