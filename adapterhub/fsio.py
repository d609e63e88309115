"""Durable file writes shared by the registry and PEFT directory output (no torch).

A file is written to a temp file on the same filesystem, fsynced, then linked or renamed into place, and
the directory is fsynced: after a crash a reader sees the old file or the whole new one, never a part
(restic ``local.go`` Save; git ``lockfile.h``). `replace_dir` does the same for a whole directory.

Files and directories get the user's normal mode (0o666 / 0o777 less the umask, as ``open`` and ``mkdir``
give), not ``mkstemp``'s 0600 / ``mkdtemp``'s 0700: a pulled adapter must be readable as any other file the
user writes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

from adapterhub.errors import ConfigError

# Hidden sibling of a `replace_dir` destination: ".<name>.ahpull-<pid>-<16 hex>". The pid tells a later
# call whether the writer is still alive; nothing else in a user's directory is ever deleted.
_DIR_TMP = re.compile(r"\.(?P<name>.+)\.ahpull-(?P<pid>[0-9]+)-[0-9a-f]{16}")
# A live writer holds its temp dir for seconds (two files, after every blob was fetched and verified), so
# one older than this is stale even when its pid is alive (reused, or another machine sharing the dir).
STALE_SECONDS = 600


def _create(path: Path) -> int:
    """Open a new file for writing with the user's default mode (the kernel applies the umask to 0o666)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tmp(target: Path, data: bytes, tmp_dir: Path) -> str:
    """`data` in a new fsynced file in `tmp_dir` (same filesystem as `target`, so it can be renamed in)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(tmp_dir / f".{target.name[:16]}.{secrets.token_hex(8)}.tmp")  # hidden, marked, unique
    fd = _create(Path(tmp))
    try:
        _write_fd(fd, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_new(target: Path, data: bytes, tmp_dir: Path, sync_dir: bool = True) -> bool:
    """Create `target` with `data` atomically and durably; never overwrites (False if it already existed)."""
    tmp = _write_tmp(target, data, tmp_dir)
    try:
        os.link(tmp, target)  # fails instead of overwriting: a concurrent writer of the same digest wins
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    if sync_dir:
        fsync_dir(target.parent)
    return True


def write_replace(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Atomically replace `target` (files that are allowed to move: refs, PEFT files); the temp file goes
    in `tmp_dir`, default the target's own directory."""
    tmp = _write_tmp(target, data, target.parent if tmp_dir is None else tmp_dir)
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dest: Path, force: bool) -> None:
    """Refuse a `replace_dir` destination that is not a directory, or not empty without `force` (ConfigError)."""
    if not dest.name:
        raise ConfigError(f"destination {str(dest)!r} has no name; choose a directory path such as ./sql-v1")
    if dest.is_symlink():
        raise ConfigError(f"destination {dest} is a symlink (to {os.readlink(dest)}); pass the directory it "
                          "points to, or another path")
    if not os.path.lexists(dest):
        return
    if not dest.is_dir():
        raise ConfigError(f"destination {dest} is a file, not a directory; remove it or choose another path")
    with os.scandir(dest) as entries:
        is_empty = next(entries, None) is None
    if not force and not is_empty:
        raise ConfigError(f"destination {dest} exists and is not empty; pass --force (force=True) to replace it as "
                          "a whole (every file in it is removed), or choose another path")


def replace_dir(dest: str | os.PathLike, files: Mapping[str, bytes], *, force: bool = False) -> Path:
    """Make `dest` a directory holding exactly `files` ({name: bytes}); see `replace_dir_with`."""

    def write(tmp: Path) -> None:
        for name, data in files.items():
            _write_fd(_create(tmp / name), data)

    return replace_dir_with(dest, write, force=force)


def replace_dir_with(dest: str | os.PathLike, write: Callable[[Path], object], *, force: bool = False) -> Path:
    """Make `dest` the directory that `write(tmp)` fills; readers see the old dir or the new one.

    A missing or empty `dest` is created or replaced; a non-empty one only with `force`, and then as a whole.
    Write order: stale temp dirs that killed calls left in the parent go first (`clean_stale_dirs`), then
    `dest` is checked (`check_destination`: ConfigError for a file, or a non-empty dir without `force`); the files
    are written (by `write`) and fsynced in a new hidden sibling ``.<name>.ahpull-<pid>-<random>``, which is fsynced; it
    then takes `dest`'s place in one step, rename(2) (which the kernel refuses over a non-empty directory,
    so a file written into `dest` meanwhile is never lost without `force`) or, with `force`, renameat2's
    RENAME_EXCHANGE (the sibling then holds the old dir); the parent is fsynced; last the sibling is deleted.
    A crash (kill -9) at any step leaves `dest` whole, old or new, and at most one stale sibling, which the
    next call into the same parent deletes. Where the exchange is not supported (not Linux, NFS) `dest` is
    moved aside and the new dir renamed in: a crash between those two renames leaves `dest` missing, its old
    content in a sibling that the next call moves back.
    """
    dest = Path(os.path.abspath(dest))
    if os.path.isdir(dest.parent):
        clean_stale_dirs(dest.parent)  # first: it may move a crashed fallback's old `dest` back into place
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.ahpull-{os.getpid()}-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o777)  # umask applies
    try:
        write(tmp)
        for entry in os.scandir(tmp):  # durable before it is swapped in, whoever wrote the files
            if entry.is_file(follow_symlinks=False):
                fd = os.open(entry.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(tmp)
        _swap_in(tmp, dest, force)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old dir after an exchange, the unused new one on failure
    return dest


def _swap_in(tmp: Path, dest: Path, force: bool) -> None:
    """Put the directory `tmp` at `dest` in one step (see `replace_dir`)."""
    if force and os.path.lexists(dest):
        check_destination(dest, force)  # still a directory: an exchange would swap a file in just as well
        if _exchange(tmp, dest):
            return
        os.rename(dest, tmp.with_name(tmp.name + "-old"))  # no atomic swap here: the documented fallback
        os.rename(tmp, dest)
        os.rename(tmp.with_name(tmp.name + "-old"), tmp)
        return
    try:
        os.rename(tmp, dest)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            check_destination(dest, force)  # names what appeared at dest meanwhile
        raise


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not glibc >= 2.28 / not Linux)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the C library or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def clean_stale_dirs(parent: Path) -> list[Path]:
    """Delete the temp dirs `replace_dir` calls killed mid-way left in `parent`; returns what was deleted.

    Only names matching ``.<name>.ahpull-<pid>-<16 hex>`` (optionally ``-old``) are candidates, and only when
    their pid is no live process on this machine, or they were created or renamed more than STALE_SECONDS
    ago (a reused pid, or another machine sharing the directory). A ``-old`` dir (the fallback's moved-aside
    destination) whose destination is missing is moved back instead: it is the last complete version.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _DIR_TMP.fullmatch(entry.name.removesuffix("-old"))
        if match and entry.is_dir(follow_symlinks=False) and _is_stale(entry, int(match["pid"])):
            if entry.name.endswith("-old") and not os.path.lexists(parent / match["name"]):
                os.rename(entry.path, parent / match["name"])
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _is_stale(entry: os.DirEntry, pid: int) -> bool:
    if pid != os.getpid() and not _is_alive(pid):
        return True
    try:  # ctime: set by mkdir and by the rename that moved an old destination in, unlike its mtime
        return time.time() - entry.stat(follow_symlinks=False).st_ctime > STALE_SECONDS
    except FileNotFoundError:
        return False  # its writer finished and deleted it meanwhile


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
