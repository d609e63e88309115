"""Compile the CPU kernels' C sources once per (source, flags, compiler, CPU) and cache the library.

The sources (``csrc/fourbit_cpu.c``, ``csrc/lora_cpu.c``, ``csrc/decode_cpu.c``, ``csrc/decode_layer.c``,
``csrc/cpu_common.h``) are
compiled into one shared library with the system C compiler (``cc -O3 -march=native -fopenmp -shared -fPIC``,
about a second) on first use, cached by a hash of everything that affects the binary, and loaded with ctypes
(which releases the GIL during a call). There is no torch C++ extension, so nothing needs ninja or
the torch headers at run time. The library links ``libgomp.so.1``; torch's wheel ships a library of that
soname, already loaded by ``import torch``, so the kernels share torch's OpenMP pool and thread count.

Cache: ``$XDG_CACHE_HOME/adapterhub-kernels/`` (default ``~/.cache/adapterhub-kernels/``), per user and
never inside a registry: a shared ``$ADAPTERHUB_HOME`` must not be a place from which every host that
reads it loads code. The directory is created with mode 0700; a cached library (or the directory) that
is not owned by the current user, or that others may write, is refused, never loaded (BuildError).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "fourbit_cpu.c", CSRC / "lora_cpu.c", CSRC / "decode_cpu.c", CSRC / "decode_layer.c")
HEADERS = (CSRC / "cpu_common.h",)  # part of the cache key, not compiled alone
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DISABLE_ENV = "ADAPTERHUB_DISABLE_CPU_KERNELS"  # "1": every compiled CPU kernel off (NF4 and LoRA)


class BuildError(RuntimeError):
    """The kernels cannot be built here (platform, CPU, compiler); callers keep the torch path."""


def is_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def cpu_flags() -> str:
    """The CPU's feature flags from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def is_buildable_here() -> bool:
    """Linux x86-64 with AVX-512 F: where the kernels must build (the build-guard test asserts it)."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and "avx512f" in cpu_flags()


def build() -> Path:
    """The compiled library's path, compiling it into the cache first if needed. Raises BuildError."""
    if not is_buildable_here():
        raise BuildError(f"no CPU kernels for {platform.system()}/{platform.machine()} without AVX-512")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc)")
    cache = cache_dir()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(cache)
    target = cache / f"adapterhub_cpu-{_key(cc)[:16]}.so"
    if not target.exists():
        _compile(cc, target)
    _check_private(target)
    return target


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapterhub-kernels"


def _check_private(path: Path) -> None:
    """A path whose bytes this process will execute: owned by this user, writable by nobody else."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(f"refusing {path}: owned by uid {info.st_uid} (this user is {os.getuid()}) with mode "
                         f"{stat.filemode(info.st_mode)}; a kernel cache must be owned by you and writable by nobody "
                         f"else. Remove it (or set XDG_CACHE_HOME to a private directory) and run again")


def _key(cc: str) -> str:
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    return hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version, cpu_flags().encode()])).hexdigest()


def _compile(cc: str, target: Path) -> None:
    # Compile to a unique temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".adapterhub_cpu-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BuildError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"compiling the CPU kernels failed: {error}") from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
