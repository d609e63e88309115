"""Moving blobs and versions between stores (local ↔ local, local ↔ OCI): only what the other side lacks.

Every blob is verified on arrival (the source re-hashes on read; the destination re-hashes, or the OCI
registry checks the digest of the upload), and the version is published only after all blobs landed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from tqdm import tqdm

from adapterhub.adapter import Adapter
from adapterhub.errors import RegistryError
from adapterhub.registry.backend import Backend
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import WIDTH, Manifest
from adapterhub.registry.refs import ResolvedRef

WORKERS = 4


class _NoBar:
    """Stands in for tqdm when progress is off: even a disabled tqdm takes tqdm's process-shared write
    lock, which a process killed mid-push (kill -9 after fork) can leave held forever."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) if progress else _NoBar()


def send_blobs(dst: Backend, task: str, blobs: Iterable[tuple[Digest, int, int]], fetch: Callable[[Digest], bytes],
               progress: bool = False, desc: str = "push", workers: int = WORKERS) -> int:
    """Upload each (digest, size, shuffle width) the destination lacks; returns how many moved.

    A local destination counts a stored blob that no longer hashes to its name as lacking it
    (`LocalStore.has_blob` re-hashes), and `put_blob` rewrites it: pushing or copying again repairs it.

    Blobs move on a few threads: hashing, zstd, fsync and HTTP all release the GIL, and per-blob
    latency (fsync, request round trips), not bandwidth, bounds small adapters.
    """
    blobs = list(dict.fromkeys(blobs))  # a tensor repeated in one adapter moves once
    with _bar(sum(size for _, size, _ in blobs), desc, progress) as bar:

        def send(blob: tuple[Digest, int, int]) -> bool:
            digest, size, width = blob
            # put_blob's own answer: a local store re-checks under the name, and a blob has_blob could not
            # vouch for without its size (over blobs.MAX_UNSIZED) may turn out intact, so nothing moved
            moved = not dst.has_blob(task, digest) and dst.put_blob(task, digest, fetch(digest), width)
            bar.update(size)
            return moved

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return sum(pool.map(send, blobs))


def fetch_blobs(src: Backend, task: str, blobs: Iterable[tuple[Digest, int]], progress: bool = False,
                desc: str = "pull", workers: int = WORKERS) -> dict[Digest, bytes]:
    """{digest: raw bytes} of each (digest, size), each verified by the source on read."""
    blobs = list(dict.fromkeys(blobs))
    with _bar(sum(size for _, size in blobs), desc, progress) as bar:

        def fetch(blob: tuple[Digest, int]) -> bytes:
            data = src.get_blob(task, blob[0], blob[1])  # the descriptor size bounds what a read allocates
            bar.update(blob[1])
            return data

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return {digest: data for (digest, _), data in zip(blobs, pool.map(fetch, blobs))}


def manifest_blobs(manifest: Manifest) -> list[tuple[Digest, int, int]]:
    """(digest, size, width) of the config and tensor blobs of a manifest, config first."""
    return [(manifest.config_digest, manifest.config_size, 1)] + [
        (t.digest, t.size, WIDTH.get(t.dtype, 1)) for t in manifest.tensors]


def copy_version(src: Backend, dst: Backend, ref: ResolvedRef, progress: bool = False,
                 tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, int]:
    """Copy one version (same manifest bytes, same version number), then point `tags` at it there;
    returns (ref at dst, blobs moved)."""
    data = src.get_manifest(ref.task, ref.digest)
    manifest = Manifest.from_json(data, f"{ref} manifest", task=ref.task)
    sizes = dict(manifest.blobs())
    with dst.session():
        moved = send_blobs(dst, ref.task, manifest_blobs(manifest), lambda d: src.get_blob(ref.task, d, sizes[d]),
                           progress, f"copy {ref}")
        copied, _ = dst.publish(ref.task, data, tags)
    return copied, moved


def copy_files_version(dst: Backend, manifest: Manifest, adapter: Adapter, progress: bool = False,
                       tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, int]:
    """Copy one version as its ORAS file variant (oras.files_manifest; ``copy --oras-files``), same version
    number, then `tags`; returns (ref at dst, blobs moved). Only an OCI destination stores that variant."""
    publish_files = getattr(dst, "publish_files", None)
    if publish_files is None:
        raise RegistryError(f"--oras-files writes the file-per-layer variant that 'oras pull' reads, to an oci:// "
                            f"registry; {dst.location} is not one (copy without --oras-files)")
    from adapterhub.registry.oras import files_manifest  # imports httpx: only for an OCI destination
    data, blobs = files_manifest(manifest, adapter)
    with dst.session():
        moved = send_blobs(dst, manifest.task, [(d, len(b), 1) for d, b in blobs.items()], blobs.__getitem__,
                           progress, f"copy {manifest.task}@v{manifest.version}")
        copied, _ = publish_files(manifest.task, manifest.version, data, tags)
    return copied, moved
