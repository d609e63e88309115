"""Durable file writes shared by the registry and PEFT directory output (no torch).

A file is written to a temp file on the same filesystem, fsynced, then linked or renamed into place, and
the directory is fsynced: after a crash a reader sees the old file or the whole new one, never a part
(restic ``local.go`` Save; git ``lockfile.h``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _write_tmp(target: Path, data: bytes, tmp_dir: Path) -> str:
    """`data` in a new fsynced file in `tmp_dir` (same filesystem as `target`, so it can be renamed in)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{target.name[:16]}.", suffix=".tmp")  # hidden, marked
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
