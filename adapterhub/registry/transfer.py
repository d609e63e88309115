"""Moving blobs and versions between stores (local ↔ local, local ↔ OCI): only what the other side lacks.

Every blob is verified on arrival (the source re-hashes on read; the destination re-hashes, or the OCI
registry checks the digest of the upload), and the version is published only after all blobs landed.
"""

from __future__ import annotations

from typing import Callable, Iterable

from tqdm import tqdm

from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import WIDTH, Manifest
from adapterhub.registry.refs import ResolvedRef


def send_blobs(dst, task: str, blobs: Iterable[tuple[Digest, int, int]], fetch: Callable[[Digest], bytes],
               progress: bool = False, desc: str = "push") -> int:
    """Upload each (digest, size, shuffle width) the destination lacks; returns how many moved."""
    blobs = list(dict.fromkeys(blobs))  # a tensor repeated in one adapter moves once
    moved = 0
    with tqdm(total=sum(size for _, size, _ in blobs), unit="B", unit_scale=True, desc=desc,
              disable=not progress, leave=False) as bar:
        for digest, size, width in blobs:
            if not dst.has_blob(task, digest):
                dst.put_blob(task, digest, fetch(digest), width)
                moved += 1
            bar.update(size)
    return moved


def manifest_blobs(manifest: Manifest) -> list[tuple[Digest, int, int]]:
    """(digest, size, width) of the config and tensor blobs of a manifest, config first."""
    return [(manifest.config_digest, manifest.config_size, 1)] + [
        (t.digest, t.size, WIDTH.get(t.dtype, 1)) for t in manifest.tensors]


def copy_version(src, dst, ref: ResolvedRef, progress: bool = False) -> tuple[ResolvedRef, int]:
    """Copy one version (same manifest bytes, same version number); returns (ref at dst, blobs moved)."""
    data = src.get_manifest(ref.task, ref.digest)
    manifest = Manifest.from_json(data, f"{ref} manifest")
    with dst.session():
        moved = send_blobs(dst, ref.task, manifest_blobs(manifest), lambda d: src.get_blob(ref.task, d),
                           progress, f"copy {ref}")
        copied, _ = dst.publish(ref.task, data)
    return copied, moved
