"""Garbage collection and verification of a local store.

GC is a frozen plan (hf_hub ``DeleteCacheStrategy`` idea): ``plan_gc`` lists unreferenced blobs and stale
temp files with ``expected_freed_bytes``; ``--dry-run`` prints it; ``execute_gc`` takes the gc lock
exclusively (so no push is in flight), recomputes what is referenced, and deletes only plan entries that
are still unreferenced and not newer than the plan: manifests first, then the blobs they named (the
reverse of the write order). Its `GcResult` counts only the files it removed itself, so the bytes it
reports as freed can be fewer than the plan expected, never more.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapterhub.errors import AdapterHubError
from adapterhub.registry.blobs import remove_file
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import Manifest, parse_config_blob

if TYPE_CHECKING:  # local.py imports this module for LocalStore.plan_gc / execute_gc / verify
    from adapterhub.registry.local import LocalStore


def referenced(store: LocalStore) -> tuple[set[Digest], set[Digest]]:
    """(manifest digests, all referenced digests) reachable from every version and tag."""
    manifests: set[Digest] = set()
    for task in store.tasks():
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
        doomed.sort(key=lambda digest: not _is_manifest(store, digest))  # manifests first
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


def _is_manifest(store: LocalStore, digest: Digest) -> bool:
    try:  # a blob another process removed meanwhile is not a manifest: BlobNotFoundError
        Manifest.from_json(store.blobs.get(digest), "")
        return True
    except AdapterHubError:
        return False


def _scandir(path):
    return (e for e in os.scandir(path) if e.is_file()) if path.is_dir() else iter(())


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    refs_checked: int
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: LocalStore) -> VerifyReport:
    """Re-hash every blob; check every ref's manifest, config and tensors exist and agree."""
    problems: list[str] = []
    bad: set[Digest] = set()
    count = 0
    for digest in store.blobs.digests():
        count += 1
        try:
            store.blobs.get(digest)
        except AdapterHubError as error:
            problems.append(str(error))
            bad.add(digest)
    refs = 0
    for task in store.tasks():
        named = {f"{task}@v{v}": d for v, d in store.versions(task).items()}
        named.update({f"{task}:{t}": d for t, d in store.tags(task).items()})
        for name, digest in sorted(named.items()):
            refs += 1
            problems.extend(_check_ref(store, name, digest, bad))
    return VerifyReport(count, refs, tuple(problems))


def _check_ref(store: LocalStore, name: str, digest: Digest, bad: set[Digest]) -> list[str]:
    if not store.blobs.has(digest):
        return [f"{name}: manifest blob {digest} is missing"]
    if digest in bad:
        return [f"{name}: manifest blob {digest} is corrupt"]
    try:
        manifest = Manifest.from_json(store.blobs.get(digest), f"{name} manifest {digest}")
        parse_config_blob(store.blobs.get(manifest.config_digest), f"{name} config {manifest.config_digest}")
    except AdapterHubError as error:
        return [f"{name}: {error}"]
    problems = []
    for tensor in manifest.tensors:
        if not store.blobs.has(tensor.digest):
            problems.append(f"{name}: tensor {tensor.name} blob {tensor.digest} is missing")
        elif tensor.digest in bad:
            problems.append(f"{name}: tensor {tensor.name} blob {tensor.digest} is corrupt")
    return problems
