"""The local store: a directory (``$ADAPTERHUB_HOME``) laid out as docs/store-format.md specifies.

Write order is blobs → manifest → version ref → tags, each step atomic, so a crash at any point leaves
either a complete version or none (temp files and unreferenced blobs are garbage for ``gc``). Version
numbers are allocated under an exclusive per-task lock; every push also holds the registry-wide ``gc``
lock *shared*, and ``gc`` execution takes it exclusively, so GC never runs beside a push in flight.
"""

from __future__ import annotations

import json
import os
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
from adapterhub.registry.refs import LATEST, LocalRefs, RefProblem, RefSpec, ResolvedRef

if TYPE_CHECKING:
    from adapterhub.registry.gc import GcPlan, GcResult, VerifyReport

LAYOUT_FILE = "adapterhub-layout"


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LocalStore:
    """Blobs, manifests and refs in one directory; the backend `Registry` uses for paths.

    Satisfies `backend.MaintainableBackend`: the method contracts are stated there.
    """

    def __init__(self, root: str | Path, *, must_exist: bool = False):
        self.root = Path(root).expanduser()
        self.blobs = BlobStore(self.root)
        self.refs = LocalRefs(self.root)
        if must_exist and not self.root.is_dir():
            raise RegistryError(f"registry {self.root} does not exist; check the path given with --registry / "
                                "ADAPTERHUB_HOME (a push creates a new store)")
        self._check_directory()
        self._check_format()

    @property
    def location(self) -> str:
        return str(self.root)

    def _check_directory(self) -> None:
        """The store is a directory, or a path one can be created at (its nearest existing ancestor is one)."""
        existing = next(p for p in (self.root, *self.root.parents) if os.path.lexists(p))
        if not existing.is_dir():
            where = "is" if existing == self.root else f"is under {existing}, which is"
            raise RegistryError(f"registry location {self.root} {where} not a directory; pass a store "
                                "directory (or a new path) with --registry / ADAPTERHUB_HOME")

    def _check_format(self) -> None:
        """formatVersion is checked before anything else is read (docs/store-format.md)."""
        path = self.root / LAYOUT_FILE
        if not path.exists():
            return
        try:
            version = json.loads(path.read_text())["formatVersion"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FormatVersionError(f"{path} is malformed ({error}); is {self.root} an adapterhub store?") from None
        if version != FORMAT_VERSION:
            raise FormatVersionError(f"{self.root} has store formatVersion {version!r}; this adapterhub reads "
                                     f"version {FORMAT_VERSION}; upgrade adapterhub or use another ADAPTERHUB_HOME")

    def session(self) -> AbstractContextManager:
        """Held for a whole push: a shared hold on the gc lock (gc takes it exclusively)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_new(self.root / LAYOUT_FILE, json.dumps({"formatVersion": FORMAT_VERSION}).encode() + b"\n",
                      self.root / "tmp")
        except OSError as error:
            raise RegistryError(f"cannot create the store at {self.root} ({error.strerror}); pass a directory you "
                                "can write with --registry / ADAPTERHUB_HOME") from None
        return self.refs.lock("gc", shared=True)

    # --- blobs (the task is irrelevant locally: one blob namespace per store) ---

    def has_blob(self, task: str, digest: str) -> bool:
        # Re-hashed, not just stat'ed: a corrupt file counts as absent, so a push or copy rewrites it (repair).
        return self.blobs.is_intact(digest)

    def put_blob(self, task: str, digest: str, raw: bytes, width: int) -> bool:
        return self.blobs.put(raw, width, digest, sync_dir=False)[1]  # publish() syncs the dir once

    def get_blob(self, task: str, digest: str, size: int | None = None) -> bytes:
        return self.blobs.get(digest, size)

    def get_manifest(self, task: str, digest: str) -> bytes:
        return self.blobs.get(digest)

    # --- refs ---

    def tasks(self) -> list[str]:
        """Tasks with at least one version ref file (a task whose versions were all removed is left out)."""
        return [task for task in self.refs.tasks() if self.refs.version_numbers(task)]

    def versions(self, task: str) -> dict[int, Digest]:
        return self.refs.versions(task)

    def tags(self, task: str) -> dict[str, Digest]:
        return self.refs.tags(task)

    def lookup(self, spec: RefSpec) -> ResolvedRef | None:
        """Reads only the ref files `spec` needs: an unreadable one raises IntegrityError naming it, any other
        unreadable ref of the task is ignored. Takes no lock; a ref removed meanwhile resolves to None."""
        if spec.kind == "version":
            digest = self.refs.version(spec.task, int(spec.value))
            return None if digest is None else ResolvedRef(spec.task, int(spec.value), digest)
        if spec.kind == "tag" and spec.value == LATEST:
            return self._latest(spec.task)
        digest = self.refs.tag(spec.task, spec.value) if spec.kind == "tag" else spec.value
        matches = [v for v, d in self.refs.versions(spec.task).items() if d == digest]  # ≤ 1: the version is
        return ResolvedRef(spec.task, max(matches), Digest(digest)) if matches else None  # in the manifest

    def _latest(self, task: str) -> ResolvedRef | None:
        """The highest version; if its ref file is unreadable that is an error (IntegrityError naming it), not
        a silent fallback to an older version. One removed meanwhile by a concurrent rm is skipped."""
        for version in reversed(self.refs.version_numbers(task)):
            digest = self.refs.version(task, version)
            if digest is not None:
                return ResolvedRef(task, version, digest)
        return None

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
            existing_digest = self.refs.version(task, version)  # an unreadable ref file there: IntegrityError
            if existing_digest is not None:
                if existing_digest != digest:
                    raise RegistryError(f"{task}@v{version} already exists here with manifest {existing_digest}, "
                                        f"not {digest}; versions are immutable, copy into another registry or task")
                self._tag(task, tags, digest)
                return ResolvedRef(task, version, digest), False
            self.blobs.put(data, 1, digest)
            if not self.refs.add_version(task, version, digest):  # only an outside writer can get here first
                raise RegistryError(f"{task}@v{version} appeared while it was being published, outside the task "
                                    f"lock; check 'adapterhub ls {task}' and push again")
            self._tag(task, tags, digest)
            return ResolvedRef(task, version, digest), True

    def _same_as_latest(self, task: str, versions: dict[int, Digest], manifest: Manifest) -> ResolvedRef | None:
        """The latest version if its content equals `manifest`'s; None when it differs or cannot be read (then
        the push makes a new version rather than failing on a bad ref it does not need)."""
        latest = max(self.refs.version_numbers(task), default=0)
        if latest not in versions:
            return None
        previous = Manifest.from_json(self.blobs.get(versions[latest]), f"{task}@v{latest}")
        return ResolvedRef(task, latest, versions[latest]) if previous.content_key() == manifest.content_key() else None

    def _tag(self, task: str, tags: tuple[str, ...], digest: str) -> None:
        for tag in tags:
            self.refs.set_tag(task, tag, digest)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        """Re-checks under the task lock that `digest` is still a version: the caller resolved it without the
        lock, and an `rm` of that version in between would otherwise leave the tag dangling."""
        with self.refs.lock(f"task-{task}"):
            if digest not in self.refs.versions(task).values():
                raise RefNotFoundError(f"cannot tag {task}:{tag}: manifest {digest} is no longer a version of "
                                       f"{task} (it was removed meanwhile); see 'adapterhub ls {task}'")
            self.refs.set_tag(task, tag, digest)

    def delete_tag(self, task: str, tag: str) -> None:
        """Removes the tag file even when it is unreadable (that is how a corrupt tag is fixed)."""
        with self.refs.lock(f"task-{task}"):
            if not self.refs.has_tag_file(task, tag):
                raise RefNotFoundError(f"{task}:{tag} does not exist; see 'adapterhub ls {task}'")
            self.refs.delete_tag(task, tag)

    def delete_version(self, task: str, version: int) -> None:
        """Tags pointing at the version go first, then the version ref (reverse of the write order).

        An unreadable version ref file can be removed too (its tags cannot be known, so they stay).
        """
        with self.refs.lock(f"task-{task}"):
            if version not in self.refs.version_numbers(task):
                raise RefNotFoundError(f"{task}@v{version} does not exist; see 'adapterhub ls {task}'")
            self.refs.removed_max(task)  # unreadable: refuse before any tag is touched
            digest = self.refs.versions(task).get(version)
            for tag, target in self.refs.tags(task).items():
                if digest is not None and target == digest:
                    self.refs.delete_tag(task, tag)
            self.refs.delete_version(task, version)

    def check_publishable(self, task: str) -> None:
        """Raise now what `publish` would raise about `task`'s refs (an unreadable ``removed-max``), so that
        `Registry.push` fails before it stores any blob."""
        self.refs.removed_max(task)

    def ref_problems(self, task: str) -> list[RefProblem]:
        """The ref files of `task` that cannot be read (`LocalRefs.problems`); `Registry.ref_problems` uses it."""
        return self.refs.problems(task)

    # --- maintenance (MaintainableBackend): a remote's server does its own ---

    def verify(self) -> VerifyReport:
        return _gc.verify_store(self)

    def plan_gc(self) -> GcPlan:
        return _gc.plan_gc(self)

    def execute_gc(self, plan: GcPlan) -> GcResult:
        return _gc.execute_gc(self, plan)
