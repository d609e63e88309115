"""`Registry`: the public facade over a local store or an OCI remote (DESIGN.md "Registry")."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, overload

import numpy as np

from adapterhub.adapter import Adapter, RawTensor
from adapterhub.base_identity import BaseIdentity, identity_from_checkpoint
from adapterhub.errors import BlobNotFoundError, ConfigError, IntegrityError, RefNotFoundError, RegistryError
from adapterhub.fsio import check_destination, replace_dir
from adapterhub.registry.backend import DEFAULT_HOME, Backend, MaintainableBackend, open_backend
from adapterhub.registry.digest import Digest
from adapterhub.registry.gc import GcPlan, GcResult, VerifyReport
from adapterhub.registry.hub import is_hub_url
from adapterhub.registry.manifest import (
    Manifest, TensorDescriptor, annotation_strings, config_blob, config_card, config_identity, parse_config_blob,
)
from adapterhub.registry.refs import LATEST, ResolvedRef, check_tag, check_task, parse_ref
from adapterhub.registry.transfer import copy_files_version, copy_version, fetch_blobs, manifest_blobs, send_blobs

__all__ = ["AdapterDiff", "DEFAULT_HOME", "LogEntry", "Registry", "TensorChange", "open_backend"]


@dataclass(frozen=True)
class LogEntry:
    ref: ResolvedRef
    created: str
    tags: tuple[str, ...]
    annotations: Mapping[str, str]
    nbytes: int


@dataclass(frozen=True)
class TensorChange:
    """One tensor that differs between two versions; the side that lacks it has None."""

    name: str
    dtype: tuple[str | None, str | None]
    shape: tuple[tuple[int, ...] | None, tuple[int, ...] | None]
    relative_change: float | None  # ‖a − b‖ / ‖a‖ (float64 over the float32 values); None: other shapes, or a = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": list(self.dtype), "relative_change": self.relative_change,
                "shape": [None if s is None else list(s) for s in self.shape]}


@dataclass(frozen=True)
class AdapterDiff:
    config: Mapping[str, tuple[Any, Any]]  # field → (a value, b value), only fields that differ
    added: tuple[str, ...]  # tensor keys only in b
    removed: tuple[str, ...]  # tensor keys only in a
    changed: tuple[tuple[str, Digest, Digest], ...]  # (key, digest in a, digest in b)
    tensors: tuple[TensorChange, ...] = ()  # every added, removed or changed tensor, by name
    base: tuple[BaseIdentity | None, BaseIdentity | None] | None = None  # the recorded bases, when they differ

    @property
    def is_empty(self) -> bool:
        return not (self.config or self.added or self.removed or self.changed or self.base)


class Registry:
    """Content-addressed adapter store: `Registry()` ($ADAPTERHUB_HOME), a path, or "oci://host:port/ns"."""

    def __init__(self, location: str | os.PathLike | None = None, *, must_exist: bool = False):
        """`must_exist`: a local store that does not exist is a `RegistryError`, not an empty store (for reading)."""
        self.backend: Backend = open_backend(location, must_exist=must_exist)

    @property
    def location(self) -> str:
        return self.backend.location

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # --- write ---

    def push(self, source: str | os.PathLike | Adapter, task: str, tags=(), annotations=None,
             progress: bool = False, base: BaseIdentity | str | os.PathLike | None = None) -> ResolvedRef:
        """Store an adapter (a PEFT dir, an `Adapter`, or ``hf://org/name[@revision]``: a PEFT repo on the
        Hugging Face Hub or in the local HF cache, with its lineage annotations, registry/hub.py) as the next
        version of `task`; returns "task@vN".

        `base`: the base it was trained on, recorded in the version and checked when it is loaded: a
        Hugging Face checkpoint dir (its identity is computed from config.json and a few tensors, without
        torch) or a `BaseIdentity` (e.g. ``Base.identity`` of the runtime). Default: the adapter's own
        (`Adapter.base`: what a registry version records, or PEFT's `base_model_name_or_path`, a name only).
        """
        check_task(task)
        tags = tuple(check_tag(t) for t in tags)
        notes = annotation_strings(annotations)
        if is_hub_url(source):
            from adapterhub.registry import hub  # imports huggingface_hub: only when the Hub is named
            source, lineage = hub.fetch(source)
            notes.update(lineage)  # the lineage wins over a user note of the same key
        adapter = source if isinstance(source, Adapter) else Adapter.from_peft_dir(source)
        if base is not None:
            adapter = _on_base(adapter, base)
        config = config_blob(adapter)
        tensors = tuple(TensorDescriptor(key, t.dtype, t.shape, Digest.of(t.data), len(t.data))
                        for key, t in adapter.tensors.items())
        manifest = Manifest(task, 0, "", Digest.of(config), len(config), tensors, notes)
        raw = {Digest.of(config): config, **{d.digest: adapter.tensors[d.name].data for d in tensors}}
        check_publishable = getattr(self.backend, "check_publishable", None)  # local: a readable removed-max
        if check_publishable is not None:
            check_publishable(task)
        with self.backend.session():
            send_blobs(self.backend, task, manifest_blobs(manifest), raw.__getitem__, progress, f"push {task}")
            ref, _ = self.backend.publish(task, manifest, tags)
        return ref

    def tag(self, ref: str, tag: str) -> ResolvedRef:
        """Point `tag` at `ref`'s version. The backend re-checks under its task lock that the version still
        exists (`RefNotFoundError` if an `rm` removed it meanwhile), so a tag never names a removed version."""
        check_tag(tag)
        resolved = self.resolve(ref)
        self.backend.set_tag(resolved.task, tag, resolved.digest)
        return resolved

    def remove(self, ref: str) -> None:
        """`task:tag` removes the tag; `task@vN` / `task@sha256:…` remove that version and its tags.

        `task@vN` and `task:tag` are removed by name, without reading the ref, so an unreadable ref file
        can be removed too.
        """
        spec = parse_ref(ref)
        if spec.kind == "tag" and spec.value != LATEST:
            self.backend.delete_tag(spec.task, spec.value)
        elif spec.kind == "version":
            self.backend.delete_version(spec.task, int(spec.value))
        else:
            self.backend.delete_version(spec.task, self.resolve(ref).version)

    def copy(self, ref: str, to: str | os.PathLike | Registry, progress: bool = False,
             tags: tuple[str, ...] | None = None, oras_files: bool = False) -> ResolvedRef:
        """Copy one version to another registry (only missing blobs move); same version number there.

        `tags`: the tags to point at it there; None (default) carries the tags that name this version here.
        `oras_files`: store it as its ORAS file variant (an oci:// destination; docs/store-format.md "ORAS").
        """
        dst = to if isinstance(to, Registry) else Registry(to)
        resolved = self.resolve(ref)
        if tags is None:
            tags = tuple(sorted(tag for tag, at in self.tags(resolved.task).items() if at.digest == resolved.digest))
        tags = tuple(check_tag(t) for t in tags)
        if oras_files:
            copied, _ = copy_files_version(dst.backend, self.manifest(resolved), self.load(str(resolved)),
                                           progress, tags)
        else:
            copied, _ = copy_version(self.backend, dst.backend, resolved, progress, tags)
        return copied

    def export_to_hub(self, ref: str, url: str) -> str:
        """Upload `ref` as a PEFT repo with a model card carrying its lineage to ``hf://org/name[@branch]``
        (registry/hub_export.py); returns the URL of the commit."""
        from adapterhub.registry import hub_export  # imports huggingface_hub: only when the Hub is named
        resolved = self.resolve(ref)
        return hub_export.upload(resolved, self.manifest(resolved), self.load(str(resolved)), url)

    # --- read ---

    def resolve(self, ref: str) -> ResolvedRef:
        """"task", "task@vN", "task:tag" or "task@sha256:…" → ResolvedRef(task, version, digest)."""
        spec = parse_ref(ref)
        found = self.backend.lookup(spec)
        if found is not None:
            return found
        versions = sorted(self.backend.versions(spec.task))
        if not versions:
            raise RefNotFoundError(f"task {spec.task!r} has no versions in {self.location}; "
                                   f"push one with 'adapterhub push DIR {spec.task}'")
        if spec.kind == "version":
            raise RefNotFoundError(f"{spec} does not exist in {self.location}; versions of {spec.task}: "
                                   f"{_ranges(versions)}")
        tags = self.backend.tags(spec.task)
        if spec.kind == "tag" and spec.value in tags:
            raise RefNotFoundError(f"{spec} names manifest {tags[spec.value]}, which is not a version of "
                                   f"{spec.task} (a dangling tag); point it at a version with 'adapterhub tag "
                                   f"{spec.task}@vN {spec.value}' or remove it with 'adapterhub rm {spec}'")
        raise RefNotFoundError(f"{spec} does not exist in {self.location}; tags of {spec.task}: "
                               f"{sorted(tags) or 'none'}")

    def manifest(self, ref: str | ResolvedRef) -> Manifest:
        resolved = ref if isinstance(ref, ResolvedRef) else self.resolve(ref)
        try:
            data = self.backend.get_manifest(resolved.task, resolved.digest)
        except BlobNotFoundError as error:  # the ref exists but its manifest does not: name the ref
            raise BlobNotFoundError(f"{resolved} names a missing manifest: {error}; or remove the version with "
                                    f"'adapterhub rm {resolved}'") from None
        return Manifest.from_json(data, f"{resolved} manifest", task=resolved.task)

    def base(self, ref: str | ResolvedRef) -> BaseIdentity | None:
        """The base identity `ref` records (None: none), from its config blob alone."""
        resolved = ref if isinstance(ref, ResolvedRef) else self.resolve(ref)
        manifest = self.manifest(resolved)
        blob = self.backend.get_blob(resolved.task, manifest.config_digest, manifest.config_size)
        return config_identity(parse_config_blob(blob, f"{resolved} config"))

    def load(self, ref: str, progress: bool = False) -> Adapter:
        """The adapter at `ref`, every blob re-hashed; the runtime and the server use this."""
        resolved = self.resolve(ref)
        manifest = self.manifest(resolved)
        config = parse_config_blob(self.backend.get_blob(resolved.task, manifest.config_digest, manifest.config_size),
                                   f"{resolved} config")
        data = fetch_blobs(self.backend, resolved.task, [(t.digest, t.size) for t in manifest.tensors],
                           progress, f"pull {resolved}")
        tensors = {}
        for t in manifest.tensors:
            if len(data[t.digest]) != t.size:
                raise IntegrityError(f"{resolved}: tensor {t.name} blob {t.digest} has {len(data[t.digest])} "
                                     f"bytes, its descriptor says {t.size}")
            tensors[t.name] = RawTensor(t.dtype, t.shape, data[t.digest])
        return Adapter(config["peft_config"], tensors, base=config_identity(config), model_card=config_card(config))

    def pull(self, ref: str, dest: str | os.PathLike, progress: bool = False, force: bool = False) -> Path:
        """Write `ref` as a PEFT dir at `dest` (created, or replaced as a whole); returns its path.

        A `dest` that is a file, or a non-empty directory without `force`, is refused (`ConfigError`) before
        anything is fetched. Every blob is verified before anything is written. The files are then written
        in a hidden sibling directory that takes `dest`'s place in one rename (`fsio.replace_dir`): after a
        crash at any point `dest` is the old directory or the complete new one, never a mix, and the next
        pull into the same parent deletes what the crashed one left.
        """
        _writing_to(dest, lambda: check_destination(Path(os.path.abspath(dest)), force))
        adapter = self.load(ref, progress)
        return _writing_to(dest, lambda: replace_dir(dest, adapter.peft_files(), force=force))

    def tasks(self) -> list[str]:
        return self.backend.tasks()

    def versions(self, task: str) -> list[int]:
        """Readable version numbers of `task`; `ref_problems` names the unreadable ones."""
        return sorted(self.backend.versions(check_task(task)))

    def tags(self, task: str) -> dict[str, ResolvedRef]:
        """{tag: version} from one listing of versions and tags: a tag read while an `rm` removes its version
        is left out, as is a tag naming no version (`verify` reports those)."""
        versions = self.backend.versions(check_task(task))
        tags = self.backend.tags(task)
        by_digest = {digest: version for version, digest in sorted(versions.items())}  # highest version wins
        return {tag: ResolvedRef(task, by_digest[d], d) for tag, d in tags.items() if d in by_digest}

    def log(self, task: str, problems: list[str] | None = None) -> list[LogEntry]:
        """Every version of `task`, newest first, with its tags and annotations.

        Without `problems`, the first unreadable ref file or manifest of `task` raises (naming it). With a
        list, those versions are left out and one line per problem is appended to it (what `ls` and `log`
        print as warnings), so one bad file never hides the rest of the history.
        """
        found = self.ref_problems(check_task(task))
        if found and problems is None:
            raise IntegrityError(found[0])
        tags = self.backend.tags(task)
        entries = []
        for version, digest in sorted(self.backend.versions(task).items(), reverse=True):
            try:
                m = self.manifest(ResolvedRef(task, version, digest))
            except (BlobNotFoundError, IntegrityError) as error:
                if problems is None:
                    raise
                found.append(str(error))
                continue
            entries.append(LogEntry(ResolvedRef(task, version, digest), m.created,
                                    tuple(sorted(t for t, d in tags.items() if d == digest)),
                                    dict(m.annotations), sum(t.size for t in m.tensors)))
        if problems is not None:
            problems.extend(found)
        return entries

    def ref_problems(self, task: str | None = None) -> list[str]:
        """One line per ref file of `task` (or of every task) that cannot be read, naming the file and the fix.

        Only stores whose refs are files have these (the local store); a remote's refs are its server's.
        """
        problems = getattr(self.backend, "ref_problems", None)
        if problems is None:
            return []
        tasks = [check_task(task)] if task is not None else self.tasks()
        return [str(problem) for name in tasks for problem in problems(name)]

    def diff(self, a: str, b: str) -> AdapterDiff:
        """Config fields, recorded bases and tensors that differ between two versions, with each differing
        tensor's shapes and its relative change ‖a − b‖ / ‖a‖ (both adapters are read and verified)."""
        adapter_a, adapter_b = self.load(a), self.load(b)
        ca, cb = adapter_a.config.to_dict(), adapter_b.config.to_dict()
        config = {k: (ca.get(k), cb.get(k)) for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
        ta, tb = adapter_a.tensors, adapter_b.tensors
        da, db = ({k: Digest.of(t.data) for k, t in tensors.items()} for tensors in (ta, tb))
        changed = tuple((k, da[k], db[k]) for k in sorted(set(ta) & set(tb)) if da[k] != db[k])
        names = sorted((set(ta) ^ set(tb)) | {k for k, _, _ in changed})
        base = (adapter_a.base, adapter_b.base) if adapter_a.base != adapter_b.base else None
        return AdapterDiff(config, tuple(sorted(set(tb) - set(ta))), tuple(sorted(set(ta) - set(tb))), changed,
                           tuple(_change(k, ta.get(k), tb.get(k)) for k in names), base)

    # --- maintenance (backends that adapterhub itself keeps: the local store) ---

    def verify(self) -> VerifyReport:
        return self._maintainable("verify").verify()

    @overload
    def gc(self, dry_run: Literal[True] = True) -> GcPlan: ...

    @overload
    def gc(self, dry_run: Literal[False]) -> GcResult: ...

    @overload
    def gc(self, dry_run: bool) -> GcPlan | GcResult: ...

    def gc(self, dry_run: bool = True) -> GcPlan | GcResult:
        """The plan (`expected_freed_bytes`) with `dry_run`; else the executed plan's result (`freed_bytes`:
        what was actually removed, which a concurrent push or another gc can make smaller)."""
        store = self._maintainable("gc")
        plan = store.plan_gc()
        return plan if dry_run else store.execute_gc(plan)

    def _maintainable(self, what: str) -> MaintainableBackend:
        if not isinstance(self.backend, MaintainableBackend):
            raise RegistryError(f"'{what}' works on local stores; {self.location} is a remote registry, whose "
                                "server does its own integrity checks and garbage collection")
        return self.backend


def _change(name: str, a: RawTensor | None, b: RawTensor | None) -> TensorChange:
    relative = None
    if a is not None and b is not None and a.shape == b.shape:
        va, vb = a.to_float32().astype(np.float64), b.to_float32().astype(np.float64)
        norm = float(np.linalg.norm(va))
        relative = float(np.linalg.norm(va - vb)) / norm if norm > 0 else None
    return TensorChange(name, (a and a.dtype, b and b.dtype), (a and a.shape, b and b.shape), relative)


def _on_base(adapter: Adapter, base: BaseIdentity | str | os.PathLike) -> Adapter:
    """The same adapter with `base` recorded as its base identity (a checkpoint dir is read for it)."""
    if not isinstance(base, BaseIdentity):
        named = adapter.config.base_model_name_or_path
        base = identity_from_checkpoint(base, name=named or os.path.abspath(os.path.expanduser(base)))
    return Adapter(adapter.config, adapter.tensors, base=base, model_card=adapter.model_card)


def _writing_to(dest: str | os.PathLike, write):
    """`write()`, its OSError (permissions, /proc, a full disk) made a one-line ConfigError naming `dest`."""
    try:
        return write()
    except OSError as error:
        raise ConfigError(f"cannot write the adapter to {dest} ({error.strerror or error}); choose a directory "
                          "you can write") from None


def _ranges(numbers: list[int]) -> str:
    return json.dumps(numbers) if len(numbers) <= 10 else f"v1..v{numbers[-1]} ({len(numbers)} versions)"
