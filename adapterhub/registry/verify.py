"""`adapterhub verify` and `verify --repair`: check a local store against docs/store-format.md, and
rewrite the blobs it needs that are missing or corrupt from a source that has them.

verify reads every ref, every manifest a ref names and every blob file, and reports one line per problem:
unreadable ref files and a bad ``removed-max`` (`LocalRefs.problems`), tags naming no version, manifests
that are malformed or claim another task, blobs that do not decode or hash to their name, and descriptors
whose size disagrees with the blob they name. Each blob is decoded with the size its descriptor states, so
a crafted file declaring gigabytes is refused before it is decompressed (blobs.decode).

Repair only ever writes content that hashes to the blob's name (`BlobStore.put` checks), so a wrong source
can fail to repair but never corrupt a store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adapterhub.adapter import CONFIG_FILE, WEIGHTS_FILE, Adapter
from adapterhub.errors import (
    AdapterHubError, BlobNotFoundError, ConfigError, IntegrityError, RefNotFoundError, RegistryError,
)
from adapterhub.registry.backend import Backend, MaintainableBackend, open_backend
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import WIDTH, Manifest, config_blob, parse_config_blob

if TYPE_CHECKING:
    from adapterhub.registry.local import LocalStore


@dataclass(frozen=True)
class Need:
    """A blob a ref needs, with what its manifest says about it: enough to fetch it again and re-encode it."""

    digest: Digest
    size: int | None  # raw bytes; None for a manifest (a ref names it by digest alone)
    width: int  # shuffle width it is stored with
    task: str  # a task whose ref needs it (a remote source keeps blobs per task)
    what: str  # "manifest", "config" or "tensor <key>"
    ref: str  # the first ref found needing it, e.g. "sql@v1"

    @property
    def role(self) -> str:
        return f"{self.what} of {self.ref}"


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    refs_checked: int
    problems: tuple[str, ...] = field(default_factory=tuple)
    damaged: tuple[Need, ...] = field(default_factory=tuple)  # needed blobs missing or corrupt: what --repair fixes

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: LocalStore) -> VerifyReport:
    """Every ref, manifest and blob file checked; the report lists every problem found (ok: none)."""
    problems: list[str] = []
    refs = _refs(store, problems)
    needs, manifests = _manifests(store, refs, problems)
    sizes, corrupt, count = _blobs(store, needs, problems)
    for name, _, digest in refs:
        problems += _ref_problems(name, digest, manifests.get(digest, ()), sizes, corrupt)
    damaged = tuple(need for digest, need in needs.items() if digest in corrupt or digest not in sizes)
    return VerifyReport(count, len(refs), tuple(problems), damaged)


def _refs(store: LocalStore, problems: list[str]) -> list[tuple[str, str, Digest]]:
    """(ref name, task, manifest digest) of every readable version and tag.

    Unreadable ref files and a bad ``removed-max`` (refs.py names them) and dangling tags go to `problems`.
    """
    out = []
    for task in store.refs.tasks():
        problems.extend(str(problem) for problem in store.refs.problems(task))
        versions = store.refs.versions(task)
        out += [(f"{task}@v{version}", task, digest) for version, digest in sorted(versions.items())]
        for tag, digest in sorted(store.refs.tags(task).items()):
            if digest in versions.values():
                out.append((f"{task}:{tag}", task, digest))
            else:
                problems.append(f"{task}:{tag}: names manifest {digest}, which is not a version of {task!r} (a "
                                f"dangling tag); point it at a version with 'adapterhub tag {task}@vN {tag}' or "
                                f"remove it with 'adapterhub rm {task}:{tag}'")
    return out


def _manifests(store: LocalStore, refs, problems: list[str]) -> tuple[dict[Digest, Need], dict[Digest, tuple]]:
    """What the refs need: {digest: Need} of every manifest and every blob a readable manifest names, and
    {manifest digest: ((blob digest, "config" or "tensor <key>", descriptor size), ...)} of those that parsed."""
    needs: dict[Digest, Need] = {}
    manifests: dict[Digest, tuple] = {}
    for name, task, digest in refs:
        if digest in needs:
            continue
        needs[digest] = Need(digest, None, 1, task, "manifest", name)
        try:
            raw = store.blobs.get(digest)
        except (BlobNotFoundError, IntegrityError):
            continue  # the blob pass and the ref pass report it; what it names stays unknown until repaired
        try:
            manifest = Manifest.from_json(raw, f"{name}: manifest {digest}", task=task)
        except IntegrityError as error:
            problems.append(str(error))
            continue
        blobs = [(manifest.config_digest, manifest.config_size, 1, "config")] + [
            (t.digest, t.size, WIDTH[t.dtype], f"tensor {t.name}") for t in manifest.tensors]
        for blob, size, width, what in blobs:
            needs.setdefault(blob, Need(blob, size, width, task, what, name))
        manifests[digest] = tuple((blob, what, size) for blob, size, _, what in blobs)
    return needs, manifests


def _blobs(store: LocalStore, needs: dict[Digest, Need], problems: list[str]):
    """Decode and hash every blob file. Returns ({digest: raw size} of the intact ones, the corrupt ones, count)."""
    sizes: dict[Digest, int] = {}
    corrupt: set[Digest] = set()
    count = 0
    for digest in store.blobs.digests():
        count += 1
        need = needs.get(digest)
        try:
            raw = store.blobs.get(digest, need.size if need else None)
        except IntegrityError as error:
            actual = _intact_size(store, digest) if need is not None and need.size is not None else None
            if actual is None:
                problems.append(str(error))
                corrupt.add(digest)
            else:  # the blob hashes right at another size: the descriptor is what is wrong
                sizes[digest] = actual
            continue
        sizes[digest] = len(raw)
        if need is not None and need.what == "config":
            try:
                parse_config_blob(raw, f"{need.role}: config blob {digest}")
            except IntegrityError as error:
                problems.append(str(error))
    return sizes, corrupt, count


def _intact_size(store: LocalStore, digest: Digest) -> int | None:
    """The raw size of a blob that decodes and hashes right at the size its own header declares, else None."""
    try:
        return len(store.blobs.get(digest))
    except (IntegrityError, BlobNotFoundError):
        return None


def _ref_problems(name: str, manifest: Digest, blobs, sizes: dict[Digest, int], corrupt: set[Digest]) -> list[str]:
    """One line per blob the ref `name` needs that is missing, corrupt, or of another size than described."""
    out = []
    for digest, what, size in ((manifest, "manifest", None), *blobs):
        if digest in corrupt or digest not in sizes:
            out.append(_damage_line(name, what, digest, digest in corrupt))
        elif size not in (None, sizes[digest]):
            out.append(f"{name}: {what} blob {digest} holds {sizes[digest]} bytes but the manifest's descriptor says "
                       f"{size} (the blob is intact, the manifest is wrong); re-push the adapter")
    return out


def _damage_line(name: str, what: str, digest: Digest, is_corrupt: bool) -> str:
    state = "is corrupt" if is_corrupt else "is missing"
    if what == "manifest":  # it holds the version's number and time: only a copy of this version has it
        return (f"{name}: {what} blob {digest} {state}; rewrite it with 'adapterhub verify --repair REGISTRY' "
                "from another registry holding this version")
    return (f"{name}: {what} blob {digest} {state}; rewrite it with 'adapterhub verify --repair SOURCE' (a PEFT "
            "directory or another registry that has it), or re-push the adapter")


# --- repair ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepairReport:
    repaired: tuple[Digest, ...]
    unrepaired: tuple[str, ...]  # one line per damaged blob the source could not supply, saying why

    def describe(self) -> str:
        lines = [f"repaired {len(self.repaired)} blobs" + (f", {len(self.unrepaired)} not repaired"
                                                         if self.unrepaired else "")]
        return "\n".join(lines + [f"  {line}" for line in self.unrepaired])


def repair_store(store: LocalStore | Backend, source: str | os.PathLike) -> RepairReport:
    """Rewrite every blob a ref needs that is missing or corrupt, from `source`: a PEFT adapter directory
    (it supplies config and tensor blobs) or another registry, a path or an oci:// URL (any blob).

    Each blob is written like a push writes it (temp file, fsync, rename; `BlobStore.put`), only when
    the source's bytes hash to its name, under the shared gc lock a push holds.
    """
    if not isinstance(store, MaintainableBackend):
        raise RegistryError(f"'verify --repair' works on local stores; {store.location} is a remote registry, whose "
                            "server keeps its own blobs")
    fetch = _source(source)
    repaired, unrepaired, tried = [], [], set()
    with store.session():
        while True:  # a repaired manifest can reveal damaged blobs it names: verify again until nothing new
            damaged = [need for need in verify_store(store).damaged if need.digest not in tried]
            if not damaged:
                break
            for need in damaged:
                tried.add(need.digest)
                problem = _repair_one(store, need, fetch, source)
                if problem is None:
                    repaired.append(need.digest)
                else:
                    unrepaired.append(problem)
    return RepairReport(tuple(repaired), tuple(unrepaired))


def _repair_one(store: LocalStore, need: Need, fetch: Callable[[Need], bytes | None], source) -> str | None:
    """Rewrite one blob from the source; None when done, else the line saying why not."""
    try:
        raw = fetch(need)
    except AdapterHubError as error:
        return f"{need.role}: blob {need.digest}: {source} has it but it is unusable ({error})"
    if raw is None:
        return f"{need.role}: blob {need.digest} is not in {source}" + (
            " (a PEFT directory holds no manifests: repair those from another registry)" if need.size is None else "")
    store.blobs.put(raw, need.width, need.digest)
    return None


def _source(source: str | os.PathLike) -> Callable[[Need], bytes | None]:
    """A function giving a needed blob's raw bytes from `source`, or None when the source lacks it."""
    path = Path(source).expanduser()
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        return _peft_source(Adapter.from_peft_dir(path))
    if "://" not in os.fspath(source) and not path.is_dir():
        raise ConfigError(f"repair source {source} is neither a PEFT adapter directory nor a registry; pass one "
                          "that holds the damaged blobs")
    backend = open_backend(source)

    def fetch(need: Need) -> bytes | None:
        try:
            if need.size is None:
                return backend.get_manifest(need.task, need.digest)
            return backend.get_blob(need.task, need.digest, need.size)
        except (BlobNotFoundError, RefNotFoundError):
            return None

    return fetch


def _peft_source(adapter: Adapter) -> Callable[[Need], bytes | None]:
    """The blobs a push of `adapter` would write: its config blob and its tensors' bytes, by digest."""
    config = config_blob(adapter)
    blobs = {Digest.of(config): config, **{Digest.of(t.data): t.data for t in adapter.tensors.values()}}
    return lambda need: blobs.get(need.digest)
