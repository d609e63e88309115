"""Names and refs: ``task@vN`` (immutable), ``task:tag`` (movable), ``task@sha256:<hex>``; local ref files.

Task names follow the OCI repository-name component grammar (lowercase), tags the OCI tag grammar, so
every local name maps to an OCI name unchanged. ``vN`` tags are reserved for versions and ``latest`` is
maintained automatically (locally it is always the highest version; on OCI it is re-pushed).
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from adapterhub.errors import InvalidNameError, LockTimeoutError
from adapterhub.fsio import write_new, write_replace
from adapterhub.registry.digest import Digest, is_digest

_TASK = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_VERSION_TAG = re.compile(r"v([1-9][0-9]*)")
LATEST = "latest"


def check_task(task: str) -> str:
    if not isinstance(task, str) or len(task) > 64 or not _TASK.fullmatch(task):
        raise InvalidNameError(
            f"task name {task!r} is not allowed: use 1-64 lowercase letters, digits and single '.', '_' or '-' "
            "between them (no '/', '..', spaces or control characters), e.g. 'sql-gen'")
    return task


def check_tag(tag: str, *, user: bool = True) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or ".." in tag:
        raise InvalidNameError(f"tag {tag!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', not "
                               "starting with '.' or '-' and without '..' (no '/', spaces or control characters)")
    if user and (tag == LATEST or _VERSION_TAG.fullmatch(tag)):
        raise InvalidNameError(f"tag {tag!r} is reserved: 'latest' is kept automatically and 'vN' names versions; "
                               "choose another tag, e.g. 'prod'")
    return tag


@dataclass(frozen=True)
class RefSpec:
    """A parsed, validated, unresolved ref: kind is "version", "tag" or "digest"."""

    task: str
    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.task}{ {'version': '@v', 'tag': ':', 'digest': '@'}[self.kind]}{self.value}"


@dataclass(frozen=True)
class ResolvedRef:
    """A ref resolved to an immutable version and its manifest digest; str() is "task@vN"."""

    task: str
    version: int
    digest: Digest

    def __str__(self) -> str:
        return f"{self.task}@v{self.version}"


def parse_ref(text: str) -> RefSpec:
    """Parse and validate a ref without resolving it; the one place refs are parsed (serve, cli, registry).

    "task" (= "task:latest"), "task@v3", "task:prod" or "task@sha256:<hex>" → RefSpec(task, kind, value),
    e.g. parse_ref("sql").task == "sql". Raises InvalidNameError saying which part is wrong.
    """
    if not isinstance(text, str):
        raise InvalidNameError(f"ref {text!r} must be a string like 'task@v3', 'task:tag' or 'task@sha256:<hex>'")
    if "@" in text:
        task, _, rest = text.partition("@")
        version = _VERSION_TAG.fullmatch(rest)
        if version:
            return RefSpec(check_task(task), "version", version.group(1))
        if is_digest(rest):
            return RefSpec(check_task(task), "digest", rest)
        raise InvalidNameError(f"ref {text!r}: after '@' expected a version like 'v3' or a digest 'sha256:<64 hex>'")
    task, colon, tag = text.partition(":")
    if colon and not tag:
        raise InvalidNameError(f"ref {text!r} ends in ':' with no tag; write '{task}:<tag>', or '{task}' for the "
                               "latest version")
    return RefSpec(check_task(task), "tag", check_tag(tag or LATEST, user=False))


class LocalRefs:
    """``refs/<task>/versions/<N>`` and ``refs/<task>/tags/<tag>``: each file holds a manifest digest."""

    def __init__(self, root: Path):
        self.dir = root / "refs"
        self.tmp = root / "tmp"
        self.locks = root / "locks"

    def tasks(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "versions").is_dir() and _TASK.fullmatch(p.name))

    def versions(self, task: str) -> dict[int, Digest]:
        return {int(name): d for name, d in self._read_dir(self.dir / task / "versions") if name.isdigit()}

    def tags(self, task: str) -> dict[str, Digest]:
        return dict(self._read_dir(self.dir / task / "tags"))

    def _read_dir(self, path: Path) -> Iterator[tuple[str, Digest]]:
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if not entry.name.startswith("."):
                    yield entry.name, Digest(entry.read_text().strip())

    def add_version(self, task: str, version: int, digest: str) -> bool:
        """Create an immutable version ref (False if that version already exists)."""
        return write_new(self.dir / task / "versions" / str(version), f"{digest}\n".encode(), self.tmp)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        write_replace(self.dir / task / "tags" / tag, f"{digest}\n".encode(), self.tmp)

    def delete_tag(self, task: str, tag: str) -> None:
        (self.dir / task / "tags" / tag).unlink(missing_ok=True)

    def delete_version(self, task: str, version: int) -> None:
        """Remembers the highest removed number first, so a removed version number is never reused."""
        if version > self.removed_max(task):
            write_replace(self.dir / task / "removed-max", f"{version}\n".encode(), self.tmp)
        (self.dir / task / "versions" / str(version)).unlink(missing_ok=True)

    def removed_max(self, task: str) -> int:
        path = self.dir / task / "removed-max"
        return int(path.read_text()) if path.exists() else 0

    def next_version(self, task: str, versions: dict[int, Digest]) -> int:
        return max(max(versions, default=0), self.removed_max(task)) + 1

    @contextmanager
    def lock(self, name: str, *, shared: bool = False, timeout: float = 60.0):
        """fcntl.flock on ``locks/<name>.lock`` (git lockfile.h idea; the kernel frees it if we die)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeoutError(f"could not lock {self.locks / name}.lock within {timeout:.0f} s; "
                                               "another adapterhub process holds it (a push or gc); retry") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)
