"""The blob store: ``blobs/sha256/<hex>``, zstd at rest, written once, verified on every read.

A stored blob file (docs/store-format.md, "Blob files") is a zstd *skippable frame* holding a 16-byte
header, then one zstd frame. Header: magic ``AHB1``, the byte-plane shuffle width (1 = none, 2 or 4 for
16/32-bit floats) and the raw size. The file is named by the sha256 of the **raw** bytes, so dedup never
depends on the codec. Shuffling puts byte k of every element together: the sign/exponent plane of float
weights is highly repetitive and bf16-valued fp32 weights have all-zero low planes (bench/registry.py).

Writes follow restic ``local.go`` Save: tmp file → fsync → link into place (never overwriting) → fsync dir.
The one exception is repair: a file whose bytes no longer hash to its name is replaced (tmp, fsync, rename).

Reads never trust a size the file itself states: a 64 KB file can declare gigabytes (a "zstd bomb"). The
caller passes the size the manifest descriptor states and the file must declare exactly that before a
byte is decompressed; decompression is streamed into a buffer of that size and stops one byte past it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from adapterhub.errors import BlobNotFoundError, IntegrityError
from adapterhub.fsio import write_new, write_replace
from adapterhub.registry.digest import Digest, verify

_SKIPPABLE_MAGIC = 0x184D2A5A  # one of the 16 zstd skippable-frame magics; `zstd -d` skips it
_MAGIC = b"AHB1"
_HEADER = struct.Struct("<II4sIQ")  # frame magic, frame size, AHB1, shuffle width, raw size
LEVEL = 3
# The largest raw size read from a blob whose size no descriptor states (manifests, and blobs verify finds
# unreferenced). OCI registries need accept manifests of only 4 MiB and config blobs are a few KB, so this
# bounds what a crafted file can make a reader allocate without limiting any real manifest.
MAX_UNSIZED = 64 * 1024 * 1024


def shuffle(data: bytes, width: int) -> bytes:
    """Byte-plane shuffle: (n, width) bytes → (width, n). Identity for width 1 or a ragged length."""
    if width == 1 or len(data) % width:
        return data
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()  # (width, n)


def unshuffle(data: bytes | bytearray, width: int) -> bytes:
    if width == 1 or len(data) % width:
        return bytes(data)
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()  # (n, width)


def encode(raw: bytes, width: int = 1) -> bytes:
    """Raw bytes → the stored file's bytes (header frame + zstd frame of the shuffled bytes)."""
    header = _HEADER.pack(_SKIPPABLE_MAGIC, 16, _MAGIC, width, len(raw))
    frame = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(shuffle(raw, width))
    return header + frame


def read_header(stored: bytes, what: str) -> tuple[int, int]:
    """(shuffle width, declared raw size) from the header frame; IntegrityError if it is not one."""
    if len(stored) < _HEADER.size:
        raise IntegrityError(f"{what}: {len(stored)} bytes is too short for a blob file (truncated)")
    frame_magic, frame_size, magic, width, size = _HEADER.unpack_from(stored)
    if (frame_magic, frame_size, magic) != (_SKIPPABLE_MAGIC, 16, _MAGIC) or width not in (1, 2, 4, 8):
        raise IntegrityError(f"{what}: not an adapterhub blob file (bad header); the file is corrupt")
    return width, size


def decode(stored: bytes, what: str, size: int | None = None) -> bytes:
    """The stored file's bytes → raw bytes, allocating at most the expected size.

    `size` is the raw size the descriptor states: the header and the zstd frame must both declare it, or
    the file is refused before anything is decompressed. Without it (a manifest, an unreferenced blob) the
    declared size may be at most MAX_UNSIZED.
    """
    width, declared = read_header(stored, what)
    if size is not None and declared != size:
        raise IntegrityError(f"{what}: the file declares {declared} raw bytes but its descriptor says {size}; "
                             "refused before decompressing (the file is corrupt or crafted); rewrite it from a "
                             "good copy with 'adapterhub verify --repair SOURCE'")
    if size is None and declared > MAX_UNSIZED:
        raise IntegrityError(f"{what}: the file declares {declared} raw bytes, more than the {MAX_UNSIZED} read "
                             "from a blob no descriptor sizes; refused before decompressing (corrupt or crafted)")
    frame = memoryview(stored)[_HEADER.size:]
    try:
        content_size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as error:
        raise IntegrityError(f"{what}: bad zstd frame ({error}); the file is corrupt") from None
    if content_size != declared:  # also a frame without a declared size (-1): the spec requires one
        raise IntegrityError(f"{what}: zstd frame declares {content_size} bytes but the blob header says {declared}; "
                             "refusing to decompress it")
    return unshuffle(_decompress(frame, declared, what), width)


def _decompress(frame: memoryview, size: int, what: str) -> bytearray:
    """Exactly `size` bytes from one zstd frame, streamed into one buffer: a frame whose data runs past its
    declared size is stopped one byte later, never decompressed whole."""
    out = bytearray(size)
    view, filled = memoryview(out), 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
            while filled < size and (n := reader.readinto(view[filled:])):
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as error:
        raise IntegrityError(f"{what}: zstd data is corrupt or truncated ({error})") from None
    if filled != size or extra:
        raise IntegrityError(f"{what}: decompressed to {'more than ' if extra else ''}{filled} bytes, expected "
                             f"{size} (truncated or oversize)")
    return out


class BlobStore:
    """Content-addressed files under ``<root>/blobs/sha256/``; temporary files under ``<root>/tmp/``."""

    def __init__(self, root: Path):
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        return self.dir / Digest(digest).hex

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, raw: bytes, width: int = 1, digest: str | None = None, sync_dir: bool = True) -> tuple[Digest, bool]:
        """Store `raw` unless an intact copy is there; returns (digest, whether this call wrote a file).

        A file already under the name is re-read and re-hashed, its size checked against len(raw): a corrupt
        one is replaced (temp file, fsync, rename over it, fsync dir), so pushing or copying the content
        again repairs a blob that fails to pull. Readers see the corrupt file or the good one, never a part.
        With sync_dir=False the caller fsyncs `self.dir` once for a batch, before anything refers to it.
        """
        if digest is None:
            digest = Digest.of(raw)
        else:
            verify(raw, digest, f"blob {digest}")
            digest = Digest(digest)
        target = self.path(digest)
        if target.exists():
            if self.is_intact(digest, len(raw)):
                return digest, False
            write_replace(target, encode(raw, width), self.tmp)
            return digest, True
        write_new(target, encode(raw, width), self.tmp, sync_dir)
        return digest, True

    def get(self, digest: str, size: int | None = None) -> bytes:
        """Raw bytes, decompressed and hash-verified (IntegrityError names the blob). `size`: the raw size
        the descriptor states, checked before decompressing (see `decode`)."""
        path = self.path(digest)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is missing from {self.dir}; run 'adapterhub verify' and "
                                    "re-push the adapter") from None
        except OSError as error:  # a directory or an unreadable file where the blob should be
            raise IntegrityError(f"blob {digest} ({path}) cannot be read ({error.strerror}); move it aside and "
                                 "run 'adapterhub verify --repair SOURCE'") from None
        raw = decode(stored, f"blob {digest} ({path})", size)
        verify(raw, digest, f"blob {digest} ({path})")
        return raw

    def is_intact(self, digest: str, size: int | None = None) -> bool:
        """Whether the file exists, decodes (declaring `size`, when given) and hashes to its name.

        Without `size`, a file declaring more than MAX_UNSIZED counts as not intact: checking it would mean
        trusting the size it states. `put`, which knows the size (len(raw)), then checks it properly.
        Cheap enough to run on every push: on 2 CPU cores, 33.6 MB of F32 tensors (a 7B r=16 q/v adapter)
        re-hash in 0.1 s, 0.4x the 0.23 s `put` takes to write them.
        """
        try:
            self.get(digest, size)
        except (BlobNotFoundError, IntegrityError):
            return False
        return True

    def stored_size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def digests(self) -> Iterator[Digest]:
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            if entry.is_file() and len(entry.name) == 64:
                yield Digest("sha256:" + entry.name)

    def delete(self, digest: str) -> int | None:
        """Remove the blob file; returns the bytes freed, or None when it was already gone."""
        return remove_file(self.path(digest))


def remove_file(path: str | os.PathLike) -> int | None:
    """Unlink `path`; its size when this call removed it, None when another process removed it first
    (so gc never counts bytes someone else freed)."""
    try:
        size = os.stat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return None
    return size
