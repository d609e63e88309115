"""The blob store: ``blobs/sha256/<hex>``, zstd at rest, written once, verified on every read.

A stored blob file (docs/store-format.md, "Blob files") is a zstd *skippable frame* holding a 16-byte
header, then one zstd frame. Header: magic ``AHB1``, the byte-plane shuffle width (1 = none, 2 or 4 for
16/32-bit floats) and the raw size. The file is named by the sha256 of the **raw** bytes, so dedup never
depends on the codec. Shuffling puts byte k of every element together: the sign/exponent plane of float
weights is highly repetitive and bf16-valued fp32 weights have all-zero low planes (bench/registry.py).

Writes follow restic ``local.go`` Save: tmp file → fsync → link into place (never overwriting) → fsync dir.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from adapterhub.errors import BlobNotFoundError, IntegrityError
from adapterhub.fsio import write_new
from adapterhub.registry.digest import Digest, verify

_SKIPPABLE_MAGIC = 0x184D2A5A  # one of the 16 zstd skippable-frame magics; `zstd -d` skips it
_MAGIC = b"AHB1"
_HEADER = struct.Struct("<II4sIQ")  # frame magic, frame size, AHB1, shuffle width, raw size
LEVEL = 3


def shuffle(data: bytes, width: int) -> bytes:
    """Byte-plane shuffle: (n, width) bytes → (width, n). Identity for width 1 or a ragged length."""
    if width == 1 or len(data) % width:
        return data
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()  # (width, n)


def unshuffle(data: bytes, width: int) -> bytes:
    if width == 1 or len(data) % width:
        return data
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()  # (n, width)


def encode(raw: bytes, width: int = 1) -> bytes:
    """Raw bytes → the stored file's bytes (header frame + zstd frame of the shuffled bytes)."""
    header = _HEADER.pack(_SKIPPABLE_MAGIC, 16, _MAGIC, width, len(raw))
    frame = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(shuffle(raw, width))
    return header + frame


def decode(stored: bytes, what: str) -> bytes:
    """The stored file's bytes → raw bytes. Rejects frames that declare or produce more than the header says."""
    if len(stored) < _HEADER.size:
        raise IntegrityError(f"{what}: {len(stored)} bytes is too short for a blob file (truncated)")
    frame_magic, frame_size, magic, width, size = _HEADER.unpack_from(stored)
    if (frame_magic, frame_size, magic) != (_SKIPPABLE_MAGIC, 16, _MAGIC) or width not in (1, 2, 4, 8):
        raise IntegrityError(f"{what}: not an adapterhub blob file (bad header); the file is corrupt")
    frame = stored[_HEADER.size:]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as error:
        raise IntegrityError(f"{what}: bad zstd frame ({error}); the file is corrupt") from None
    if declared != size:
        raise IntegrityError(f"{what}: zstd frame declares {declared} bytes but the blob header says {size}; "
                             "refusing to decompress it")
    try:
        out = zstandard.ZstdDecompressor().decompressobj()
        data = out.decompress(frame)
    except zstandard.ZstdError as error:
        raise IntegrityError(f"{what}: zstd data is corrupt or truncated ({error})") from None
    if len(data) != size or not out.eof:
        raise IntegrityError(f"{what}: decompressed to {len(data)} bytes, expected {size} (truncated or oversize)")
    return unshuffle(data, width)


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
        """Store `raw` unless present; returns (digest, whether a new file was written).

        With sync_dir=False the caller fsyncs `self.dir` once for a batch, before anything refers to it.
        """
        if digest is None:
            digest = Digest.of(raw)
        else:
            verify(raw, digest, f"blob {digest}")
            digest = Digest(digest)
        target = self.path(digest)
        if target.exists():
            return digest, False
        write_new(target, encode(raw, width), self.tmp, sync_dir)
        return digest, True

    def get(self, digest: str) -> bytes:
        """Raw bytes, decompressed and hash-verified (IntegrityError names the blob)."""
        path = self.path(digest)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is missing from {self.dir}; run 'adapterhub verify' and "
                                    "re-push the adapter") from None
        raw = decode(stored, f"blob {digest} ({path})")
        verify(raw, digest, f"blob {digest} ({path})")
        return raw

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
