"""The local store: a directory (``$ADAPTERHUB_HOME``) laid out as docs/store-format.md specifies.

Write order is blobs → manifest → version ref → tags, each step atomic, so a crash at any point leaves
either a complete version or none (temp files and unreferenced blobs are garbage for ``gc``). Version
numbers are allocated under an exclusive per-task lock; every push also holds the registry-wide ``gc``
lock *shared*, and ``gc`` execution takes it exclusively, so GC never runs beside a push in flight.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.errors import FormatVersionError, RefNotFoundError, RegistryError
from adapterhub.fsio import fsync_dir, write_new
from adapterhub.registry import gc as _gc
from adapterhub.registry.blobs import BlobStore
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import FORMAT_VERSION, Manifest
from adapterhub.registry.refs import LATEST, LocalRefs, RefSpec, ResolvedRef

if TYPE_CHECKING:
    from adapterhub.registry.gc import GcPlan, GcResult, VerifyReport

LAYOUT_FILE = "adapterhub-layout"


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LocalStore:
    """Blobs, manifests and refs in one directory; the backend `Registry` uses for paths.

    Satisfies `backend.MaintainableBackend`: the method contracts are stated there.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.blobs = BlobStore(self.root)
        self.refs = LocalRefs(self.root)
        self._check_format()

    @property
    def location(self) -> str:
        return str(self.root)

    def _check_format(self) -> None:
        """formatVersion is checked before anything else is read (docs/store-format.md)."""
        path = self.root / LAYOUT_FILE
        if not path.exists():
            return
        try:
            version = json.loads(path.read_text())["formatVersion"]
        except (ValueError, KeyError, TypeError) as error:
            raise FormatVersionError(f"{path} is malformed ({error}); is {self.root} an adapterhub store?") from None
        if version != FORMAT_VERSION:
            raise FormatVersionError(f"{self.root} has store formatVersion {version!r}; this adapterhub reads "
                                     f"version {FORMAT_VERSION}; upgrade adapterhub or use another ADAPTERHUB_HOME")

    def session(self) -> AbstractContextManager:
        """Held for a whole push: a shared hold on the gc lock (gc takes it exclusively)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_new(self.root / LAYOUT_FILE, json.dumps({"formatVersion": FORMAT_VERSION}).encode() + b"\n",
                  self.root / "tmp")
        return self.refs.lock("gc", shared=True)

    # --- blobs (the task is irrelevant locally: one blob namespace per store) ---

    def has_blob(self, task: str, digest: str) -> bool:
        return self.blobs.has(digest)

    def put_blob(self, task: str, digest: str, raw: bytes, width: int) -> bool:
        return self.blobs.put(raw, width, digest, sync_dir=False)[1]  # publish() syncs the dir once

    def get_blob(self, task: str, digest: str) -> bytes:
        return self.blobs.get(digest)

    def get_manifest(self, task: str, digest: str) -> bytes:
        return self.blobs.get(digest)

    # --- refs ---

    def tasks(self) -> list[str]:
        return self.refs.tasks()

    def versions(self, task: str) -> dict[int, Digest]:
        return self.refs.versions(task)

    def tags(self, task: str) -> dict[str, Digest]:
        return self.refs.tags(task)

    def lookup(self, spec: RefSpec) -> ResolvedRef | None:
        versions = self.refs.versions(spec.task)
        if spec.kind == "version":
            digest = versions.get(int(spec.value))
            return None if digest is None else ResolvedRef(spec.task, int(spec.value), digest)
        if spec.kind == "tag" and spec.value == LATEST:
            return ResolvedRef(spec.task, max(versions), versions[max(versions)]) if versions else None
        digest = self.refs.tags(spec.task).get(spec.value) if spec.kind == "tag" else spec.value
        matches = [v for v, d in versions.items() if d == digest]  # ≤ 1: the version is in the manifest
        return ResolvedRef(spec.task, max(matches), Digest(digest)) if matches else None

    def publish(self, task: str, manifest: Manifest | bytes, tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, bool]:
        """Manifest blob → version ref → tags, under the task lock (see `Backend.publish`).

        A `Manifest` gets the next version, unless its content equals the latest version's (then that
        version is returned: re-pushing adds nothing). Exact `bytes` (a copy) keep their own version number.
        Returns (ref, whether a new version was created).
        """
        if self.blobs.dir.is_dir():
            fsync_dir(self.blobs.dir)  # the blobs put with sync_dir=False are durable before any ref names them
        with self.refs.lock(f"task-{task}"):
            versions = self.refs.versions(task)
            if isinstance(manifest, Manifest):
                existing = self._same_as_latest(task, versions, manifest)
                if existing is not None:
                    self._tag(task, tags, existing.digest)
                    return existing, False
                data = manifest.at(self.refs.next_version(task, versions), now_rfc3339()).to_json()
            else:
                data = manifest
            version = Manifest.from_json(data, f"manifest for {task}").version
            digest = Digest.of(data)
            if version in versions:
                if versions[version] != digest:
                    raise RegistryError(f"{task}@v{version} already exists here with manifest {versions[version]}, "
                                        f"not {digest}; versions are immutable, copy into another registry or task")
                self._tag(task, tags, digest)
                return ResolvedRef(task, version, digest), False
            self.blobs.put(data, 1, digest)
            self.refs.add_version(task, version, digest)
            self._tag(task, tags, digest)
            return ResolvedRef(task, version, digest), True

    def _same_as_latest(self, task: str, versions: dict[int, Digest], manifest: Manifest) -> ResolvedRef | None:
        if not versions:
            return None
        latest = max(versions)
        previous = Manifest.from_json(self.blobs.get(versions[latest]), f"{task}@v{latest}")
        return ResolvedRef(task, latest, versions[latest]) if previous.content_key() == manifest.content_key() else None

    def _tag(self, task: str, tags: tuple[str, ...], digest: str) -> None:
        for tag in tags:
            self.refs.set_tag(task, tag, digest)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        with self.refs.lock(f"task-{task}"):
            self.refs.set_tag(task, tag, digest)

    def delete_tag(self, task: str, tag: str) -> None:
        with self.refs.lock(f"task-{task}"):
            if tag not in self.refs.tags(task):
                raise RefNotFoundError(f"{task}:{tag} does not exist; see 'adapterhub ls {task}'")
            self.refs.delete_tag(task, tag)

    def delete_version(self, task: str, version: int) -> None:
        """Tags pointing at the version go first, then the version ref (reverse of the write order)."""
        with self.refs.lock(f"task-{task}"):
            digest = self.refs.versions(task).get(version)
            if digest is None:
                raise RefNotFoundError(f"{task}@v{version} does not exist; see 'adapterhub ls {task}'")
            for tag, target in self.refs.tags(task).items():
                if target == digest:
                    self.refs.delete_tag(task, tag)
            self.refs.delete_version(task, version)

    # --- maintenance (MaintainableBackend): a remote's server does its own ---

    def verify(self) -> VerifyReport:
        return _gc.verify_store(self)

    def plan_gc(self) -> GcPlan:
        return _gc.plan_gc(self)

    def execute_gc(self, plan: GcPlan) -> GcResult:
        return _gc.execute_gc(self, plan)
