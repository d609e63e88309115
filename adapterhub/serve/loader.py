"""Model names → adapter digests → `Adapter` objects, read from the registry off the engine thread.

A request's ``model`` is the base name (no adapter) or a registry ref: ``task@v3``, ``task:prod``,
``task@sha256:…``, or a bare task name meaning ``task:latest``. Every request resolves its ref
again (a cheap ref read), so a moved tag is seen at once; the pool is keyed by the manifest digest,
so two versions of one task are two different slots and a request in flight keeps its version.

With ``allow_hub`` (``serve --allow-hub``) a ``model`` may also be ``hf://org/name[@revision]``: the first
request imports that revision's commit into the registry (registry/hub.py `pull_through`) and the name is
then pinned to that version's digest for the life of the server, so later requests neither contact the
Hub nor re-read its cache, and a revision moved on the Hub is picked up by a restart.

Named adapters (vLLM's `load_lora_adapter` and `--lora-modules name=ref`) pin a name to one version when it
is added: a registry ref resolved then, hf://… imported then, or a PEFT directory read then and kept in memory
(its pool key is a sha256 of its PEFT files, so the same directory under two names is one slot).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

from adapterhub.adapter import Adapter, adapter_source
from adapterhub.errors import ConfigError, InvalidNameError, RefNotFoundError, RequestError
from adapterhub.registry.hub import is_hub_url, pull_through
from adapterhub.registry.refs import parse_ref


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names: the base alone (digest None) or one adapter version."""

    model: str  # as the client wrote it
    digest: str | None  # manifest digest "sha256:…", the pool key
    pinned_ref: str | None  # "task@sha256:…": reads exactly this version
    label: str  # "task@v3" where the registry says, for listings
    root: str | None = None  # a named adapter: what it was loaded from (vLLM's `root` in /v1/models)


class AdapterSource:
    """Resolves refs and reads adapters from a registry; concurrent reads of one digest share one load."""

    def __init__(self, registry, check: Callable[[Adapter, str], object], base_name: str, allow_hub: bool = False):
        """check(adapter, model): the pool's check of an adapter against the base (`AdapterPool.check`)."""
        self.registry = registry
        self.base_name = base_name
        self.allow_hub = allow_hub
        self._check = check
        self._lock = threading.Lock()
        self._loading: dict[str, Future] = {}
        self._hub_pins: dict[str, ResolvedModel] = {}  # "hf://…" -> the version its first use imported
        self._hub_lock = threading.Lock()  # one import at a time: a second request for it waits, then reuses it
        self._aliases: dict[str, ResolvedModel] = {}  # named adapters: name -> the version it was added as
        self._directories: dict[str, Adapter] = {}  # pool key -> an adapter read from a PEFT directory

    def resolve(self, model: str | None) -> ResolvedModel:
        if model in (None, "", self.base_name):
            return ResolvedModel(model or self.base_name, None, None, self.base_name)
        named = self._aliases.get(model)
        if named is not None:
            return named
        if self.registry is None:
            raise RefNotFoundError(
                f"model '{model}' is not the base '{self.base_name}' and this server has no registry; "
                f"start it with --registry or use model='{self.base_name}'"
            )
        if is_hub_url(model):
            return self._resolve_hub(model)
        try:
            spec = parse_ref(model)  # a bare task means task:latest
            resolved = self.registry.resolve(str(spec))
        except (InvalidNameError, RefNotFoundError) as error:  # the client wrote it: say which field
            raise type(error)(f"'model' is {model!r}: {error}") from None
        digest = str(getattr(resolved, "digest", resolved))  # a ResolvedRef, or a bare digest
        label = str(resolved) if hasattr(resolved, "version") else model
        return ResolvedModel(model, digest, f"{spec.task}@{digest}", label)

    def _resolve_hub(self, model: str) -> ResolvedModel:
        if not self.allow_hub:
            raise RefNotFoundError(f"'model' is {model!r}: this server does not import from the Hugging Face Hub; "
                                   "push the adapter into its registry (adapterhub push hf://… TASK) or start it "
                                   "with --allow-hub")
        with self._hub_lock:
            pinned = self._hub_pins.get(model)
            if pinned is None:
                try:
                    ref = pull_through(self.registry, model)
                except ConfigError as error:  # a malformed hf:// name: the client wrote it
                    raise ConfigError(f"'model' is {model!r}: {error}") from None
                pinned = self._hub_pins[model] = ResolvedModel(model, ref.digest, f"{ref.task}@{ref.digest}", str(ref))
        return pinned

    def add_alias(self, name: str, source: str) -> ResolvedModel:
        """Pins `name` to the adapter `source` names now; 400 when the name is taken (vLLM's answer)."""
        if not isinstance(name, str) or not name or name == self.base_name:
            raise RequestError(f"the adapter name {name!r} must be a non-empty string other than the base's name "
                               f"'{self.base_name}'")
        with self._lock:
            self._check_free(name)
        kind = adapter_source(source)
        if isinstance(kind, Path):
            adapter = Adapter.from_peft_dir(kind)
            hashed = hashlib.sha256()
            for content in adapter.peft_files().values():
                hashed.update(hashlib.sha256(content).digest())
            digest = f"sha256:{hashed.hexdigest()}"
            with self._lock:
                self._directories[digest] = adapter
            resolved = ResolvedModel(name, digest, None, name, str(kind))
        else:
            version = self.resolve(source)
            if version.digest is None:
                raise RequestError(f"{source!r} is the base model, not an adapter; pass an adapter ref or directory")
            resolved = ResolvedModel(name, version.digest, version.pinned_ref, name, version.label)
        with self._lock:
            self._check_free(name)  # again: a concurrent request may have taken it while this one read
            self._aliases[name] = resolved
        return resolved

    def _check_free(self, name: str) -> None:
        """Under `_lock`."""
        if name in self._aliases:
            raise RequestError(f"an adapter named '{name}' is already loaded; unload it first "
                               "(POST /v1/unload_lora_adapter) or pick another name")

    def alias(self, name: str) -> ResolvedModel:
        with self._lock:
            resolved = self._aliases.get(name)
        if resolved is None:
            raise RefNotFoundError(f"no adapter named {name!r} was loaded; GET /v1/models lists the names")
        return resolved

    def remove_alias(self, name: str) -> None:
        with self._lock:
            gone = self._aliases.pop(name, None)
            if gone is not None and all(r.digest != gone.digest for r in self._aliases.values()):
                self._directories.pop(gone.digest, None)

    def aliases(self) -> dict[str, ResolvedModel]:
        with self._lock:
            return dict(self._aliases)

    def load(self, resolved: ResolvedModel) -> Adapter:
        """Reads and validates one adapter version; callers asking for the same digest wait on one read."""
        with self._lock:
            future = self._loading.get(resolved.digest)
            is_owner = future is None
            if is_owner:
                future = self._loading[resolved.digest] = Future()
        if not is_owner:
            return future.result()
        try:
            adapter = self._read(resolved)
            future.set_result(adapter)
            return adapter
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            with self._lock:
                del self._loading[resolved.digest]

    def _read(self, resolved: ResolvedModel) -> Adapter:
        adapter = self._directories.get(resolved.digest)
        if adapter is None:
            adapter = self.registry.load(resolved.pinned_ref)  # every blob re-hashed on the way
        self._check(adapter, resolved.model)  # the pool's check, before the request queues
        return adapter

