"""Garbage collection and verification of a local store.

GC is a frozen plan (hf_hub ``DeleteCacheStrategy`` idea): ``plan_gc`` lists unreferenced blobs and stale
temp files with ``expected_freed_bytes``; ``--dry-run`` prints it; ``execute`` takes the gc lock
exclusively (so no push is in flight), recomputes what is referenced, and deletes only plan entries that
are still unreferenced and not newer than the plan: manifests first, then the blobs they named (the
reverse of the write order).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from adapterhub.errors import AdapterHubError
from adapterhub.registry.digest import Digest
from adapterhub.registry.local import LocalStore
from adapterhub.registry.manifest import Manifest, parse_config_blob


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
    created: float
    blobs: tuple[tuple[Digest, int], ...]  # (digest, stored bytes)
    temp_files: tuple[tuple[str, int], ...]  # (path, bytes)
    expected_freed_bytes: int

    def describe(self) -> str:
        lines = [f"gc plan: {len(self.blobs)} unreferenced blobs, {len(self.temp_files)} temp files, "
                 f"{self.expected_freed_bytes} bytes to free"]
        lines += [f"  delete blob {d} ({n} bytes)" for d, n in self.blobs]
        lines += [f"  delete temp {p} ({n} bytes)" for p, n in self.temp_files]
        return "\n".join(lines)


def plan_gc(store: LocalStore) -> GcPlan:
    created = time.time()
    _, reachable = referenced(store)
    blobs = tuple((d, store.blobs.stored_size(d)) for d in sorted(store.blobs.digests()) if d not in reachable)
    temps = tuple((e.path, e.stat().st_size) for e in _scandir(store.blobs.tmp) if e.is_file())
    return GcPlan(created, blobs, temps, sum(n for _, n in blobs) + sum(n for _, n in temps))


def execute_gc(store: LocalStore, plan: GcPlan) -> int:
    """Apply `plan`; returns the bytes actually freed (≤ expected when a concurrent push re-used a blob)."""
    freed = 0
    with store.refs.lock("gc"):
        _, reachable = referenced(store)
        doomed = [(d, n) for d, n in plan.blobs if d not in reachable and _older(store.blobs.path(d), plan.created)]
        doomed.sort(key=lambda item: not _is_manifest(store, item[0]))  # manifests first
        for path, size in plan.temp_files:
            if _older(path, plan.created):
                os.unlink(path)
                freed += size
        for digest, size in doomed:
            store.blobs.delete(digest)
            freed += size
    return freed


def _older(path, created: float) -> bool:
    try:
        return os.stat(path).st_mtime <= created
    except FileNotFoundError:
        return False


def _is_manifest(store: LocalStore, digest: Digest) -> bool:
    try:
        Manifest.from_json(store.blobs.get(digest), "")
        return True
    except AdapterHubError:
        return False


def _scandir(path):
    return os.scandir(path) if path.is_dir() else iter(())


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
