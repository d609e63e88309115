"""Names and refs: ``task@vN`` (immutable), ``task:tag`` (movable), ``task@sha256:<hex>``; local ref files.

Task names follow the OCI repository-name component grammar (lowercase), tags the OCI tag grammar, so
every local name maps to an OCI name unchanged. ``vN`` tags are reserved for versions and ``latest`` is
maintained automatically (locally it is always the highest version; on OCI it is re-pushed).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import IntegrityError, InvalidNameError, LockTimeoutError, RegistryError
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


@dataclass(frozen=True)
class RefProblem:
    """A ref file adapterhub cannot read (a bad digest, invalid UTF-8, a symlink, a directory...).

    str() is one line naming the file, what is wrong with it and what to do next.
    """

    path: Path
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}; {self.fix}"


# A ref file is one line ("sha256:<64 hex>\n", 72 bytes); reading more than this proves it is not one.
_MAX_REF_BYTES = 512
_VERSION_NAME = re.compile(r"[1-9][0-9]*")
_NUMBER = re.compile(r"[0-9]+")


def _read_small_file(path: Path) -> str | None:
    """The text of a regular file of at most _MAX_REF_BYTES; None if it does not exist.

    Raises ValueError saying what is wrong. The file is opened without following a symlink (a ref must not
    read a file outside the store) and without blocking (a FIFO would hang a reader forever).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None  # removed by a concurrent rm between listing and reading: simply not there
    except OSError as error:
        if path.is_symlink():
            raise ValueError(f"is a symlink (to {os.readlink(path)!r}); ref files must be regular files") from None
        raise ValueError(f"cannot be read ({error.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is a directory or a special file, not a regular file")
        data = os.read(fd, _MAX_REF_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_REF_BYTES:
        raise ValueError(f"is longer than {_MAX_REF_BYTES} bytes; a ref file holds one line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"is not UTF-8 text (starts {data[:24]!r})") from None


def _parse_digest_file(path: Path) -> Digest | None:
    """The manifest digest in one ref file; None if it does not exist. ValueError says what is wrong."""
    text = _read_small_file(path)
    if text is None:
        return None
    if not is_digest(text.strip()):
        shown = text.strip()[:80]
        raise ValueError(f"holds {shown!r}, not a manifest digest 'sha256:<64 lowercase hex>'" if shown else
                         "is empty; it should hold a manifest digest 'sha256:<64 lowercase hex>'")
    return Digest(text.strip())


class LocalRefs:
    """``refs/<task>/versions/<N>`` and ``refs/<task>/tags/<tag>``: each file holds a manifest digest.

    Reads take no lock and tolerate concurrent writers: a file removed between listing and reading is
    simply not there. A ref file that cannot be read is scoped to its own ref: listings (`versions`, `tags`)
    leave it out and `problems` names it; reading that ref itself (`version`, `tag`) raises IntegrityError
    naming the file; other refs and other tasks keep working.
    """

    def __init__(self, root: Path):
        self.dir = root / "refs"
        self.tmp = root / "tmp"
        self.locks = root / "locks"

    def tasks(self) -> list[str]:
        """Every task directory with a ``versions/`` directory (possibly empty after rm), sorted."""
        return sorted(name for name in _list(self.dir) if _TASK.fullmatch(name) and
                      (self.dir / name / "versions").is_dir())

    def versions(self, task: str) -> dict[int, Digest]:
        """{N: digest} of the readable version refs; unreadable ones are in `problems(task)`."""
        return {int(name): digest for name, digest, _ in self._scan(task, "versions") if digest is not None}

    def tags(self, task: str) -> dict[str, Digest]:
        """{tag: digest} of the readable tag files; unreadable ones are in `problems(task)`."""
        return {name: digest for name, digest, _ in self._scan(task, "tags") if digest is not None}

    def version(self, task: str, version: int) -> Digest | None:
        """The digest of ``task@vN``; None if absent. IntegrityError naming the file if it is unreadable."""
        return self._read_or_raise(task, "versions", str(version))

    def tag(self, task: str, tag: str) -> Digest | None:
        """The digest of ``task:tag``; None if absent. IntegrityError naming the file if it is unreadable."""
        return self._read_or_raise(task, "tags", tag)

    def version_numbers(self, task: str) -> list[int]:
        """Every version number with a ref file, readable or not (so no number is reused or skipped), sorted."""
        return sorted(int(name) for name in _list(self.dir / task / "versions") if _VERSION_NAME.fullmatch(name))

    def problems(self, task: str) -> list[RefProblem]:
        """Every ref file of `task` adapterhub cannot read (versions, tags, removed-max), one per file.

        `adapterhub verify` reports these; `ls` and `log` print them as warnings.
        """
        found = [RefProblem(self.dir / task / kind, "is not a directory", f"move it aside: adapterhub keeps the "
                            f"{kind[:-1]} refs of {task!r} in this directory") for kind in ("versions", "tags")
                 if os.path.lexists(self.dir / task / kind) and not (self.dir / task / kind).is_dir()]
        found += [problem for _, _, problem in self._scan(task, "versions") + self._scan(task, "tags") if problem]
        try:
            self._read_removed_max(task)
        except ValueError as error:
            found.append(self._removed_max_problem(task, error))
        return found

    def _scan(self, task: str, kind: str) -> list[tuple[str, Digest | None, RefProblem | None]]:
        """(name, digest, problem) of each ref file in ``refs/<task>/<kind>/`` whose name is a ref.

        Hidden files are temp files of writers; other names are not refs (the spec says to ignore them).
        """
        is_ref = _VERSION_NAME.fullmatch if kind == "versions" else _is_user_tag
        out = []
        for name in _list(self.dir / task / kind):
            if is_ref(name):
                path = self.dir / task / kind / name
                try:
                    out.append((name, _parse_digest_file(path), None))
                except ValueError as error:
                    out.append((name, None, RefProblem(path, str(error), _fix(path, task, name, kind))))
        return out

    def _read_or_raise(self, task: str, kind: str, name: str) -> Digest | None:
        path = self.dir / task / kind / name
        try:
            return _parse_digest_file(path)
        except ValueError as error:
            raise IntegrityError(str(RefProblem(path, str(error), _fix(path, task, name, kind)))) from None

    def add_version(self, task: str, version: int, digest: str) -> bool:
        """Create an immutable version ref (False if that version already exists)."""
        return write_new(self.dir / task / "versions" / str(version), f"{digest}\n".encode(), self.tmp)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        write_replace(self.dir / task / "tags" / tag, f"{digest}\n".encode(), self.tmp)

    def has_tag_file(self, task: str, tag: str) -> bool:
        """Whether ``tags/<tag>`` exists at all, readable or not (so a corrupt tag can be removed)."""
        return os.path.lexists(self.dir / task / "tags" / tag)

    def delete_tag(self, task: str, tag: str) -> None:
        _unlink_ref(self.dir / task / "tags" / tag)

    def delete_version(self, task: str, version: int) -> None:
        """Remembers the highest removed number first, so a removed version number is never reused.

        Call it under the task lock. A crash after ``removed-max`` is written and before the version ref is
        unlinked leaves the version in place with its number already reserved: harmless.
        """
        path = self.dir / task / "versions" / str(version)
        _check_removable(path)
        if version > self.removed_max(task):
            write_replace(self.dir / task / "removed-max", f"{version}\n".encode(), self.tmp)
        _unlink_ref(path)

    def removed_max(self, task: str) -> int:
        """The highest removed version number of `task` (0 if none was removed).

        A ``removed-max`` that is not a plain number raises IntegrityError naming the file: guessing a value
        could hand a removed version number out again, so pushes and removals of `task` stop until it is fixed.
        """
        try:
            return self._read_removed_max(task)
        except ValueError as error:
            raise IntegrityError(str(self._removed_max_problem(task, error))) from None

    def _read_removed_max(self, task: str) -> int:
        text = _read_small_file(self.dir / task / "removed-max")
        if text is not None and not _NUMBER.fullmatch(text.strip()):
            raise ValueError(f"holds {text.strip()[:40]!r}, not a version number")
        return 0 if text is None else int(text.strip())

    def _removed_max_problem(self, task: str, error: ValueError) -> RefProblem:
        path = self.dir / task / "removed-max"
        return RefProblem(path, f"{error} (it records the highest removed version of {task!r})", (
            f"pushes and removals of {task!r} are refused until it is fixed, so that no removed version number "
            f"is handed out again; write the highest version number of {task!r} ever removed into it (if unsure, "
            f"any number at least as high as every version {task!r} ever had), e.g. 'echo 99 > {path}'"))

    def next_version(self, task: str, versions: dict[int, Digest]) -> int:
        """One more than every version number ever used: readable, unreadable and removed ones."""
        return max(max(versions, default=0), *self.version_numbers(task), self.removed_max(task)) + 1

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


def _list(path: Path) -> list[str]:
    """Sorted names in `path` except hidden ones (writers' temp files); [] if it is missing or not a dir."""
    try:
        return sorted(name for name in os.listdir(path) if not name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _check_removable(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise RegistryError(f"{path} is a directory, not a ref file; adapterhub does not delete directories it did "
                            f"not write: move it aside ('mv {path} <elsewhere>')")


def _unlink_ref(path: Path) -> None:
    """Remove a ref file (a symlink itself, never its target); gone already is fine (a concurrent rm)."""
    _check_removable(path)
    path.unlink(missing_ok=True)


def _is_user_tag(name: str) -> bool:
    try:
        check_tag(name)  # the one rule for tag names: what a user may write is what a tag file may be named
    except InvalidNameError:
        return False
    return True


def _fix(path: Path, task: str, name: str, kind: str) -> str:
    """What to do about the unreadable ref file `path` (`name` of kind "versions" or "tags")."""
    if path.is_dir() and not path.is_symlink():
        return f"adapterhub never writes a directory there; move it aside ('mv {path} <elsewhere>')"
    if kind == "versions":
        return (f"{task}@v{name} cannot be read: write its manifest digest back into the file if you know it, "
                f"else remove the version with 'adapterhub rm {task}@v{name}'")
    return (f"{task}:{name} cannot be read: point it at a version again with 'adapterhub tag {task}@vN {name}' "
            f"or remove it with 'adapterhub rm {task}:{name}'")
