"""The Hugging Face Hub as an adapter source: ``hf://org/name[@revision]`` (no torch).

An adapter on the Hub is a PEFT repo: ``adapter_config.json`` + ``adapter_model.safetensors`` at its root.
`download` asks huggingface_hub's `snapshot_download` for those two files of a revision (a branch, a tag or
a commit; default: the default branch); with ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, it
finds them in the local HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), where huggingface_hub keeps one folder
per commit. The folder it returns is ``snapshots/<commit>``, so the revision is resolved to an immutable
commit sha before anything is read.

An import is an ordinary push whose manifest records where it came from (lineage annotations `LINEAGE`):
``hf.repo``, ``hf.revision`` (as asked; ``main`` for the default branch) and ``hf.commit`` (the resolved
sha). `pull_through` (``generate --adapter hf://…``, ``serve --allow-hub``) first looks for a version of
the task that records the same repo and commit, and reuses it: a commit is imported once, and afterwards
the version is read by its manifest digest like any other.

Pickle weights (``adapter_model.bin``) are never downloaded or loaded: a repo that has only those is
refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from adapterhub.adapter import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, Adapter
from adapterhub.errors import AdapterFormatError, ConfigError, RefNotFoundError, RemoteError
from adapterhub.registry.refs import ResolvedRef, check_task

HUB_PREFIX = "hf://"
DEFAULT_REVISION = "main"  # huggingface_hub's default branch name
LINEAGE = "hf."  # annotation prefix; org.adapterhub.* is reserved for the store's own keys
_TRUE = {"1", "on", "yes", "true"}  # how huggingface_hub reads its boolean variables


def one_line(text: str, limit: int = 200) -> str:
    """oci_client.one_line, imported on use: a local registry never imports httpx (backend.py)."""
    from adapterhub.registry.oci_client import one_line as fit
    return fit(text, limit)


def is_hub_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


@dataclass(frozen=True)
class HubSource:
    """A PEFT repo on the Hub and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")

    @classmethod
    def parse(cls, text: str) -> HubSource:
        """``hf://org/name`` or ``hf://org/name@revision``; ConfigError saying which part is wrong."""
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        usage = "write hf://org/name or hf://org/name@revision (a branch, tag or commit)"
        if not is_hub_url(text):
            raise ConfigError(f"{one_line(str(text))!r} is not a Hugging Face Hub location; {usage}")
        repo_id, sep, revision = text[len(HUB_PREFIX):].partition("@")
        if sep and (not revision or not revision.isprintable() or any(c.isspace() for c in revision)):
            raise ConfigError(f"{one_line(text)!r} has an empty or unprintable revision after '@'; {usage}")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ConfigError(f"{one_line(text)!r}: {one_line(repo_id)!r} is not a Hugging Face repo id "
                              f"({one_line(str(error), 120)}); {usage}") from None
        return cls(repo_id, revision or None)


@dataclass(frozen=True)
class HubSettings:
    """huggingface_hub's environment, read when a command runs: huggingface_hub reads it once at import,
    which in a server or a test can be before HF_HUB_OFFLINE or HF_HOME is set. None: huggingface_hub's
    own default (its cache, its stored token, huggingface.co)."""

    is_offline: bool = False
    cache_dir: str | None = None
    token: str | None = None
    endpoint: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HubSettings:
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE
        home = env.get("HF_HOME")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
        return cls(offline, os.path.expanduser(cache) if cache else None, env.get("HF_TOKEN") or None,
                   (env.get("HF_ENDPOINT") or "").rstrip("/") or None)


@dataclass(frozen=True)
class Snapshot:
    """The files of one commit of a repo, on local disk (a folder of the HF cache)."""

    source: HubSource
    path: Path
    commit: str

    def lineage(self) -> dict[str, str]:
        return {LINEAGE + "repo": self.source.repo_id, LINEAGE + "revision": self.source.revision or DEFAULT_REVISION,
                LINEAGE + "commit": self.commit}


def download(source: HubSource, settings: HubSettings) -> Snapshot:
    """The PEFT files of `source` at one commit: downloaded (only those two) or found in the local cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(source.repo_id, revision=source.revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                                   cache_dir=settings.cache_dir, local_files_only=settings.is_offline,
                                   token=settings.token, endpoint=settings.endpoint)
    except LocalEntryNotFoundError:
        raise RefNotFoundError(_not_cached(source, settings)) from None
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise RefNotFoundError(f"{source}: the Hub has no repo {source.repo_id!r} this token may read "
                               f"({type(error).__name__}); check the name, or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise RefNotFoundError(f"{source}: repo {source.repo_id!r} has no revision {source.revision!r}; "
                               "name a branch, tag or commit it has") from None
    except (HfHubHTTPError, OSError) as error:  # IncompleteSnapshotError is an OSError
        raise RemoteError(f"{source}: {type(error).__name__}: {one_line(str(error), 200)}") from None
    path = Path(folder)
    return Snapshot(source, path, path.name)  # huggingface_hub names the folder by the commit sha


def _not_cached(source: HubSource, settings: HubSettings) -> str:
    """Why an offline look-up failed: the repo is not cached at all, or not at this revision (which are)."""
    from huggingface_hub import scan_cache_dir

    why = "HF_HUB_OFFLINE=1 is set" if settings.is_offline else "the Hub cannot be reached"
    cached: set[str] = set()
    try:
        for repo in scan_cache_dir(settings.cache_dir).repos:
            if repo.repo_id == source.repo_id and repo.repo_type == "model":
                cached = {ref for revision in repo.revisions for ref in revision.refs} | {
                    revision.commit_hash[:12] for revision in repo.revisions}
    except Exception:  # noqa: BLE001 - a missing or unreadable cache: nothing is cached
        cached = set()
    where = settings.cache_dir or "the default HF cache"
    fix = f"download it where the Hub is reachable: hf download {source.repo_id}" + (
        f" --revision {source.revision}" if source.revision else "")
    if cached:
        return (f"{source}: revision {source.revision or DEFAULT_REVISION!r} of {source.repo_id} is not in {where} "
                f"and {why}; cached: {', '.join(sorted(cached))}; {fix}")
    return f"{source}: repo {source.repo_id} is not in {where} and {why}; {fix}"


def read_adapter(snapshot: Snapshot, settings: HubSettings) -> Adapter:
    """The adapter of a snapshot; a repo with only pickle weights is refused without reading them."""
    path = snapshot.path
    what = f"{snapshot.source} (commit {snapshot.commit[:12]})"
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_FILE).exists() or _hub_has(snapshot, PICKLE_FILE, settings):
            raise AdapterFormatError(
                f"{what} has only {PICKLE_FILE}, a pickle, which adapterhub never loads; ask its owner for "
                f"{WEIGHTS_FILE} (peft save_pretrained writes it by default), or convert a copy you trust with "
                "safetensors and push that directory")
        raise AdapterFormatError(f"{what} has no {WEIGHTS_FILE}; a PEFT adapter repo has {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE} at its root")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterFormatError(f"{what} has no {CONFIG_FILE}; a PEFT adapter repo has it at its root")
    try:
        return Adapter.from_peft_dir(path)
    except (AdapterFormatError, ConfigError) as error:
        raise type(error)(f"{what}: {error}") from None


def _hub_has(snapshot: Snapshot, filename: str, settings: HubSettings) -> bool:
    """Whether the Hub lists `filename` at the snapshot's commit (False offline or when it cannot tell)."""
    if settings.is_offline:
        return False
    from huggingface_hub import HfApi
    try:
        return HfApi(endpoint=settings.endpoint, token=settings.token).file_exists(
            snapshot.source.repo_id, filename, revision=snapshot.commit)
    except Exception:  # noqa: BLE001 - only refines an error message
        return False


def fetch(url: str, settings: HubSettings | None = None) -> tuple[Adapter, dict[str, str]]:
    """(adapter, lineage annotations) of ``hf://org/name[@revision]``: what `Registry.push` stores."""
    settings = settings or HubSettings.from_env()
    snapshot = download(HubSource.parse(url), settings)
    return read_adapter(snapshot, settings), snapshot.lineage()


def default_task(repo_id: str) -> str:
    """The task a pull-through import goes to: ``hf.<org>.<name>``, lowercased, other characters as '-'
    (task names are OCI repository components); a name too long for a task is shortened with a hash."""
    parts = [re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") or "x" for part in repo_id.split("/")]
    task = ".".join(["hf", *parts])
    if len(task) > 64:
        task = task[:47].rstrip("._-") + "-" + hashlib.sha256(repo_id.encode()).hexdigest()[:16]
    return check_task(task)


def find_import(registry, task: str, repo_id: str, commit: str) -> ResolvedRef | None:
    """The newest version of `task` whose lineage names `repo_id` at `commit`, or None."""
    problems: list[str] = []  # an unreadable version is skipped here; `ls` and `verify` report it
    for entry in registry.log(task, problems):
        notes = entry.annotations
        if notes.get(LINEAGE + "repo") == repo_id and notes.get(LINEAGE + "commit") == commit:
            return entry.ref
    return None


def pull_through(registry, url: str, task: str | None = None, settings: HubSettings | None = None) -> ResolvedRef:
    """The registry version holding ``hf://…`` at the commit its revision names now: imported into `task`
    (default: `default_task`) on first use, reused afterwards (found by its lineage, nothing re-read)."""
    settings = settings or HubSettings.from_env()
    source = HubSource.parse(url)
    snapshot = download(source, settings)
    task = task or default_task(source.repo_id)
    found = find_import(registry, task, source.repo_id, snapshot.commit)
    if found is not None:
        return found
    return registry.push(read_adapter(snapshot, settings), task, annotations=snapshot.lineage())
