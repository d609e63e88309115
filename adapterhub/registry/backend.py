"""`Backend`: the storage protocol behind `Registry`, and `open_backend`, which picks one by URL scheme.

A backend stores three kinds of objects for each task: blobs (config and tensor bytes, named by digest),
manifests (one per version, also named by digest) and refs (version numbers and tags that name a
manifest). `Registry` (registry.py) and the transfer code (transfer.py) only use the methods listed in
`Backend`; nothing outside this package knows which backend it talks to.

A new kind of remote (S3, ...) is one new module with a class that satisfies `Backend`
(tests/registry/test_backend_protocol.py checks it) plus one entry in `BACKENDS`. The Hugging Face Hub has
no versions or tags of its own, so it is a source and a destination (hub.py, hub_export.py), not a backend.
"""

from __future__ import annotations

import importlib
import os
import re
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from adapterhub.errors import RegistryError

if TYPE_CHECKING:  # annotations only: gc.py and manifest.py stay out of this module's import graph
    from adapterhub.registry.digest import Digest
    from adapterhub.registry.gc import GcPlan, GcResult, VerifyReport
    from adapterhub.registry.manifest import Manifest
    from adapterhub.registry.refs import RefSpec, ResolvedRef

DEFAULT_HOME = "~/.cache/adapterhub"

# URL scheme → "module:Class". Imported on first use, so a local registry never imports httpx.
BACKENDS: dict[str, str] = {
    "oci": "adapterhub.registry.oci:OciStore",
}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@runtime_checkable
class Backend(Protocol):
    """Blobs, manifests and refs of many tasks, in one place (a directory, a remote registry).

    **Write order** (a push or a copy): blobs (config, tensors) → manifest → version ref → tags.
    **Delete order** is the reverse: tags → version ref (`delete_version`) → manifest and blobs (only by
    garbage collection, which a backend MAY leave to its server).

    What a reader sees after a crash (or ``kill -9``) at each step:

    - during or after the blobs: no new version. Blobs and temp files are left unreferenced; they are
      garbage for ``gc`` (local) or for the server's own garbage collection (remote).
    - after the manifest, before the version ref: still no new version; the manifest is unreferenced.
      (On OCI the manifest and the version ref are one request: ``PUT manifests/vN``.)
    - after the version ref: a complete version; ``task@vN`` and ``task@sha256:…`` resolve, and so does
      ``task`` where `latest` is derived from the versions (local).
    - between two tags: every tag names a complete version, some still the old one. On OCI, ``latest``
      is one of these tags, so ``task`` may still resolve to the previous version.
    - deleting, between a version's tags and its version ref: the version still resolves by number and
      by digest, with fewer tags. No ref ever names a manifest or blob that is missing. (On OCI one
      ``DELETE`` removes the manifest with all its tags, then `latest` is re-pushed: a crash in between
      leaves ``task`` (= `latest`) unresolvable until the next push.)

    What must be atomic: a blob or manifest name appears only with its complete, verified content
    (`put_blob`, and the manifest in `publish`); a version ref is created once and never replaced; a tag
    is replaced in one step (readers see the old target or the new one). `publish` makes a version
    visible only after every blob its manifest names is durable. Allocating a version number is atomic
    where the storage allows it (local: under a per-task lock); an OCI registry has no compare-and-swap,
    so concurrent pushers of one task there can collide (oci.py, "Remote limits").
    """

    @property
    def location(self) -> str:
        """Where this backend lives ("/home/me/.cache/adapterhub", "oci://host:port/ns"); used in messages."""
        ...

    def session(self) -> AbstractContextManager:
        """A context held for a whole push or copy, from the first blob to the last ref.

        It keeps garbage collection from deleting blobs that the push has written but not yet referenced
        (local: the gc lock, held shared). A backend without such a race returns a no-op context.
        """
        ...

    def has_blob(self, task: str, digest: str) -> bool:
        """Whether the blob `digest` is stored where `task`'s manifests can name it (one cheap check)."""
        ...

    def put_blob(self, task: str, digest: str, raw: bytes, width: int) -> bool:
        """Store `raw` (uncompressed) as `digest`, for `task`; atomic and never overwriting.

        The backend verifies that `raw` hashes to `digest` (or makes its server do so) and raises
        `IntegrityError` / `RemoteError` otherwise. `width` is the byte-plane shuffle width for
        compression (docs/store-format.md); a backend that stores raw bytes ignores it. Returns whether
        this call stored it (False: it was already there; a backend that cannot tell returns True).
        A blob need not be durable when this returns: `publish` makes the blobs durable before any ref
        names them.
        """
        ...

    def get_blob(self, task: str, digest: str, size: int | None = None) -> bytes:
        """The raw bytes of `digest`, re-hashed on every read (`IntegrityError` on a mismatch,
        `BlobNotFoundError` / `RefNotFoundError` when missing).

        `size` is the raw size the manifest descriptor states: a blob of another size is refused
        (`IntegrityError`), and a backend that decompresses refuses it before decompressing, so a small
        file declaring gigabytes never makes a reader allocate them (local: blobs.decode).
        """
        ...

    def get_manifest(self, task: str, digest: str) -> bytes:
        """The exact bytes of the manifest `digest` of `task`, verified like `get_blob`."""
        ...

    def tasks(self) -> list[str]:
        """Every task with at least one version, sorted."""
        ...

    def versions(self, task: str) -> dict[int, Digest]:
        """{version number: manifest digest} of `task` ({} for an unknown task)."""
        ...

    def tags(self, task: str) -> dict[str, Digest]:
        """{user tag: manifest digest} of `task`; excludes `latest` and the reserved ``vN`` names."""
        ...

    def lookup(self, spec: RefSpec) -> ResolvedRef | None:
        """Resolve a parsed ref to (task, version, digest), or None if it names nothing.

        `latest` means the highest version; a digest resolves to the highest version with that manifest.
        `Registry.resolve` turns None into a `RefNotFoundError` listing what exists.
        """
        ...

    def publish(self, task: str, manifest: Manifest | bytes, tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, bool]:
        """Write the manifest, then its version ref, then `tags`; returns (ref, whether a version was created).

        The manifest's blobs must all be stored first (`put_blob`). A `Manifest` gets the next version
        number, unless its content equals the latest version's (that version is returned, tagged, and
        nothing is written). Exact `bytes` (a copy from another backend) keep their own version number;
        if that number exists with other bytes, raise (`RegistryError` / `RemoteError`): versions are
        immutable.
        """
        ...

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        """Point `tag` at the existing manifest `digest`, replacing its old target atomically."""
        ...

    def delete_tag(self, task: str, tag: str) -> None:
        """Remove one tag (`RefNotFoundError` if absent; `RemoteError` where the protocol cannot)."""
        ...

    def delete_version(self, task: str, version: int) -> None:
        """Remove the version's tags, then its version ref (reverse write order); blobs stay for gc.

        `latest` then means the highest remaining version. A backend should never hand the number out
        again (local: ``removed-max``); an OCI registry cannot remember it, so a removed highest number
        is reused there.
        """
        ...


@runtime_checkable
class MaintainableBackend(Backend, Protocol):
    """A backend whose storage adapterhub itself keeps (the local store): it can verify and collect garbage.

    Remote registries do this server-side; `Registry.verify` / `Registry.gc` refuse them with a message.
    """

    def verify(self) -> VerifyReport:
        """Re-hash every blob and check that every ref's manifest, config and tensors exist and agree."""
        ...

    def plan_gc(self) -> GcPlan:
        """What gc would delete now (unreferenced blobs, temp files of interrupted writes); deletes nothing."""
        ...

    def execute_gc(self, plan: GcPlan) -> GcResult:
        """Delete what `plan` lists that is still unreferenced and not newer than the plan, manifests
        first, while no push is in flight; the result counts only what this call removed."""
        ...


def open_backend(location: str | os.PathLike | None, *, must_exist: bool = False) -> Backend:
    """The backend for `location`: a URL whose scheme is in `BACKENDS`, else a directory path (LocalStore).

    None means ``$ADAPTERHUB_HOME``, else `DEFAULT_HOME`. `must_exist`: a local store directory that does not
    exist is an error (`RegistryError`) rather than an empty store, for commands that only read.
    """
    location = os.fspath(location) if location is not None else os.environ.get("ADAPTERHUB_HOME") or DEFAULT_HOME
    scheme = _SCHEME.match(location)
    if scheme is None:
        from adapterhub.registry.local import LocalStore
        return LocalStore(location, must_exist=must_exist)
    target = BACKENDS.get(scheme.group(1).lower())
    if target is None and scheme.group(1).lower() in ("http", "https"):
        raise RegistryError(f"registry location {location!r} is a web URL, not a registry location; an OCI "
                            "distribution registry is written oci://host[:port]/namespace (adapterhub speaks https "
                            "to it, or http to a loopback host)")
    if target is None:
        known = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise RegistryError(f"registry location {location!r} has the scheme '{scheme.group(1)}://', which "
                            f"adapterhub has no backend for; use a directory path or one of: {known}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(location)
