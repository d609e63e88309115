"""Garbage collection of a local store (verification is in verify.py, re-exported here).

GC is a frozen plan (hf_hub ``DeleteCacheStrategy`` idea): ``plan_gc`` lists unreferenced blobs and stale
temp files with ``expected_freed_bytes``; ``--dry-run`` prints it; ``execute_gc`` takes the gc lock
exclusively (so no push is in flight), recomputes what is referenced, and deletes only plan entries that
are still unreferenced and not newer than the plan. Its `GcResult` counts only the files it removed itself,
so the bytes it reports as freed can be fewer than the plan expected, never more.

GC reads the manifests refs name, and of every other blob only its name and size: a garbage blob is never
decompressed (it may be large, or crafted). So garbage is deleted in name order, not manifests first: no
ref names any of it, no push runs meanwhile, and a garbage manifest left by a crash is itself garbage that
nothing can resolve (a later push or copy of it re-sends, and re-verifies, every blob it names).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterhub.errors import IntegrityError
from adapterhub.registry.blobs import remove_file
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import Manifest
from adapterhub.registry.verify import VerifyReport, verify_store  # noqa: F401  (the maintenance API lives here)

if TYPE_CHECKING:  # local.py imports this module for LocalStore.plan_gc / execute_gc / verify
    from adapterhub.registry.local import LocalStore


def referenced(store: LocalStore) -> tuple[set[Digest], set[Digest]]:
    """(manifest digests, all referenced digests) reachable from every version and tag.

    An unreadable version or tag file stops gc (IntegrityError naming it): what it references is unknown,
    and deleting that would turn a fixable ref into a lost version.
    """
    manifests: set[Digest] = set()
    for task in store.refs.tasks():
        unreadable = [p for p in store.refs.problems(task) if p.path.name != "removed-max"]
        if unreadable:
            raise IntegrityError(f"gc stopped: {unreadable[0]}; gc cannot tell what it references, so it deletes "
                                 "nothing until the ref file is fixed or removed ('adapterhub verify' lists them)")
        manifests.update(store.versions(task).values())
        manifests.update(store.tags(task).values())
    reachable = set(manifests)
    for digest in manifests:
        manifest = Manifest.from_json(store.blobs.get(digest), f"manifest {digest}")
        reachable.update(d for d, _ in manifest.blobs())
    return manifests, reachable


@dataclass(frozen=True)
class GcPlan:
    """What gc would delete, frozen when planned; `expected_freed_bytes` is a forecast, not a result."""

    created: float
    blobs: tuple[tuple[Digest, int], ...]  # (digest, stored bytes)
    temp_files: tuple[tuple[str, int], ...]  # (path, bytes)
    expected_freed_bytes: int

    def describe(self) -> str:
        lines = [f"gc plan: {len(self.blobs)} unreferenced blobs, {len(self.temp_files)} temp files, "
                 f"{self.expected_freed_bytes} bytes expected to be freed"]
        lines += [f"  delete blob {d} ({n} bytes)" for d, n in self.blobs]
        lines += [f"  delete temp {p} ({n} bytes)" for p, n in self.temp_files]
        return "\n".join(lines)


@dataclass(frozen=True)
class GcResult:
    """What an executed plan removed. Entries a push re-referenced, files newer than the plan and files
    another process removed first are not in it, so `freed_bytes` ≤ `plan.expected_freed_bytes`."""

    plan: GcPlan
    removed_blobs: tuple[Digest, ...]
    removed_temp_files: tuple[str, ...]
    freed_bytes: int  # sizes of the files this run unlinked

    @property
    def skipped(self) -> int:
        """Planned entries this run did not remove (kept, or already gone)."""
        planned = len(self.plan.blobs) + len(self.plan.temp_files)
        return planned - len(self.removed_blobs) - len(self.removed_temp_files)

    def describe(self) -> str:
        text = (f"freed {self.freed_bytes} bytes ({len(self.removed_blobs)} blobs, "
                f"{len(self.removed_temp_files)} temp files)")
        if self.skipped:
            text += (f"; the plan expected {self.plan.expected_freed_bytes} bytes, {self.skipped} planned entries "
                     "were re-referenced by a push, newer than the plan, or already removed by another process")
        return text


def plan_gc(store: LocalStore) -> GcPlan:
    created = time.time()
    _, reachable = referenced(store)
    blobs = tuple((d, n) for d in sorted(store.blobs.digests()) if d not in reachable
                  and (n := _size(store.blobs.path(d))) is not None)
    temps = tuple((e.path, n) for e in _scandir(store.blobs.tmp) if (n := _size(e.path)) is not None)
    return GcPlan(created, blobs, temps, sum(n for _, n in blobs) + sum(n for _, n in temps))


def execute_gc(store: LocalStore, plan: GcPlan) -> GcResult:
    """Apply `plan`; the result counts the files this call removed and their sizes when removed."""
    with store.refs.lock("gc"):
        _, reachable = referenced(store)
        doomed = [d for d, _ in plan.blobs if d not in reachable and _older(store.blobs.path(d), plan.created)]
        temps = [(p, remove_file(p)) for p, _ in plan.temp_files if _older(p, plan.created)]
        blobs = [(d, store.blobs.delete(d)) for d in doomed]
    removed_temps = tuple(p for p, n in temps if n is not None)  # None: another process removed it first
    removed_blobs = tuple(d for d, n in blobs if n is not None)
    freed = sum(n for _, n in temps + blobs if n is not None)
    return GcResult(plan, removed_blobs, removed_temps, freed)


def _size(path) -> int | None:
    """The file's size, or None when it vanished after being listed (a push renamed its temp file)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _older(path, created: float) -> bool:
    try:
        return os.stat(path).st_mtime <= created
    except FileNotFoundError:
        return False


def _scandir(path):
    return (e for e in os.scandir(path) if e.is_file()) if path.is_dir() else iter(())
