"""Store integrity: zstd bombs, repair on push / copy / `verify --repair`, what verify reports, what gc reads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from adapterhub import Registry
from adapterhub.errors import BlobNotFoundError, IntegrityError
from adapterhub.registry import blobs
from adapterhub.registry.blobs import BlobStore
from adapterhub.registry.digest import Digest
from tests.registry.helpers import blob_file, cli, make_adapter, store_tree, zstd_rle_frame

GIB2 = 2 << 30
BOMB_BLOCKS = GIB2 >> 17  # 16384 RLE blocks of 128 KiB: a 64 KiB file that decompresses to 2 GiB

pytestmark = pytest.mark.timeout(60)


def _path(root, digest):
    return root / "blobs" / "sha256" / Digest(digest).hex


def _flip(path, position=-5):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


# --- zstd bombs ---------------------------------------------------------------------------------


def test_a_small_blob_declaring_gigabytes_is_refused_before_decompressing():
    stored = blob_file(zstd_rle_frame(GIB2, BOMB_BLOCKS), GIB2)
    assert len(stored) < 70_000
    start = time.perf_counter()
    with pytest.raises(IntegrityError, match="blob x: the file declares 2147483648 raw bytes but its descriptor "
                                             "says 4096; refused before decompressing"):
        blobs.decode(stored, "blob x", 4096)
    with pytest.raises(IntegrityError, match="declares 2147483648 raw bytes, more than the 67108864"):
        blobs.decode(stored, "blob x")  # no descriptor (a manifest, an unreferenced blob): a fixed cap
    honest_header = blob_file(zstd_rle_frame(GIB2, BOMB_BLOCKS), 4096)  # the frame alone declares 2 GiB
    with pytest.raises(IntegrityError, match="zstd frame declares 2147483648 bytes but the blob header says 4096"):
        blobs.decode(honest_header, "blob x", 4096)
    overrun = blob_file(zstd_rle_frame(4096, BOMB_BLOCKS), 4096)  # declares 4 KiB, holds 2 GiB of blocks
    with pytest.raises(IntegrityError, match="blob x: .*(corrupt or truncated|more than 4096 bytes)"):
        blobs.decode(overrun, "blob x", 4096)
    assert time.perf_counter() - start < 2


def test_decoding_bombs_keeps_memory_low():
    """Measured in a fresh process by its VmHWM (the peak of its own address space; ru_maxrss would inherit
    the parent's peak across fork + exec): before the fix, the first bomb alone peaked at 4 GB."""
    script = """
from adapterhub.registry import blobs
from tests.registry.helpers import blob_file, zstd_rle_frame
G = 2 << 30
bombs = [blob_file(zstd_rle_frame(G, G >> 17), G), blob_file(zstd_rle_frame(G, G >> 17), 4096),
         blob_file(zstd_rle_frame(4096, G >> 17), 4096), blob_file(zstd_rle_frame(60 << 20, 480), 60 << 20)]
for stored in bombs:
    for size in (4096, None):
        try:
            blobs.decode(stored, "bomb", size)
        except Exception as error:
            assert type(error).__name__ == "IntegrityError", error
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert int(out.stdout.split()[-1]) < 400_000, out.stdout  # KiB: the process itself, and one 60 MiB blob


def test_pull_and_verify_refuse_a_bomb_in_place_of_a_tensor(tmp_path):
    registry = Registry(tmp_path / "store")
    ref = registry.push(make_adapter(), "sql")
    tensor = registry.manifest(str(ref)).tensors[0]
    _path(tmp_path / "store", tensor.digest).write_bytes(blob_file(zstd_rle_frame(GIB2, BOMB_BLOCKS), GIB2, 4))
    with pytest.raises(IntegrityError, match=f"blob {tensor.digest}.*declares 2147483648 raw bytes but its "
                                             f"descriptor says {tensor.size}"):
        registry.pull(str(ref), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    problems = registry.verify().problems
    assert any(tensor.digest in p and "declares 2147483648" in p for p in problems)
    assert any(p.startswith(f"sql@v1: tensor {tensor.name} blob {tensor.digest} is corrupt") for p in problems)


# --- repair -------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_pushing_again_repairs_a_corrupt_blob(tmp_path, damage):
    source = make_adapter(use_dora=True).save_peft_dir(tmp_path / "src")
    registry = Registry(tmp_path / "store")
    ref = registry.push(source, "sql")
    manifest = registry.manifest(str(ref))
    other = _path(tmp_path / "store", manifest.tensors[1].digest).read_bytes()
    for digest in (manifest.config_digest, manifest.tensors[0].digest):
        path = _path(tmp_path / "store", digest)
        good = path.read_bytes()
        if damage == "flip":
            _flip(path)
        else:
            path.write_bytes(good[:-9] if damage == "truncate" else other)
        with pytest.raises(IntegrityError, match=digest):
            registry.pull(str(ref), tmp_path / "out")
        assert str(registry.push(source, "sql")) == "sql@v1"  # same content: the same version, blob rewritten
        assert path.read_bytes() == good
    assert registry.verify().ok
    assert registry.load(str(ref)).tensors == make_adapter(use_dora=True).tensors
    assert not list((tmp_path / "store" / "tmp").iterdir())  # the repair's temp files are gone


def test_copying_again_repairs_a_corrupt_blob_and_restores_a_missing_one(tmp_path):
    good, bad = Registry(tmp_path / "good"), Registry(tmp_path / "bad")
    ref = good.push(make_adapter(), "sql")
    good.copy(str(ref), bad)
    tensors = bad.manifest(str(ref)).tensors
    _flip(_path(tmp_path / "bad", tensors[0].digest))
    _path(tmp_path / "bad", tensors[1].digest).unlink()
    assert not bad.verify().ok
    good.copy(str(ref), bad)
    assert bad.verify().ok and bad.load(str(ref)).tensors == good.load(str(ref)).tensors


def test_verify_repair_from_another_registry_fixes_manifests_and_what_they_name(tmp_path):
    good, bad = Registry(tmp_path / "good"), Registry(tmp_path / "bad")
    ref = good.push(make_adapter(use_dora=True), "sql", tags=["prod"])
    good.copy(str(ref), bad)
    bad.tag(str(ref), "prod")
    tensors = bad.manifest(str(ref)).tensors
    _flip(_path(tmp_path / "bad", ref.digest))  # the manifest: what it names is unknown until it is repaired
    _flip(_path(tmp_path / "bad", tensors[0].digest))
    _path(tmp_path / "bad", tensors[1].digest).unlink()

    code, out = cli("verify", "-r", tmp_path / "bad")
    assert code == 1 and "Traceback" not in out and f"sql@v1: manifest blob {ref.digest} is corrupt" in out
    code, out = cli("verify", "--repair", tmp_path / "good", "-r", tmp_path / "bad")
    assert code == 0, out
    assert out.startswith("repaired 3 blobs\nok: ")
    assert bad.load("sql:prod").tensors == good.load("sql:prod").tensors


def test_verify_repair_from_a_peft_directory(tmp_path):
    adapter = make_adapter()
    source = adapter.save_peft_dir(tmp_path / "src")
    registry = Registry(tmp_path / "store")
    ref = registry.push(source, "sql")
    manifest = registry.manifest(str(ref))
    for digest in (manifest.config_digest, manifest.tensors[2].digest):
        _flip(_path(tmp_path / "store", digest))
    code, out = cli("verify", "--repair", source, "-r", tmp_path / "store")
    assert code == 0 and out.startswith("repaired 2 blobs\nok: "), out
    assert registry.load(str(ref)).tensors == adapter.tensors

    _flip(_path(tmp_path / "store", ref.digest))  # a PEFT directory cannot supply a manifest
    code, out = cli("verify", "--repair", source, "-r", tmp_path / "store")
    assert code == 1 and "Traceback" not in out
    assert f"manifest of sql@v1: blob {ref.digest} is not in {source} (a PEFT directory holds no manifests" in out
    assert out.strip().splitlines()[-1].startswith("Error: IntegrityError: ")


def test_verify_repair_needs_a_source_that_exists(tmp_path):
    Registry(tmp_path / "store").push(make_adapter(), "sql")
    code, out = cli("verify", "--repair", tmp_path / "nowhere", "-r", tmp_path / "store")
    assert code == 1 and out.count("\n") == 1 and "nowhere is neither a PEFT adapter directory nor a registry" in out


# --- what verify reports ------------------------------------------------------------------------


def test_verify_reports_a_descriptor_whose_size_disagrees_with_its_blob(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.push(make_adapter(), "sql")
    manifest = registry.manifest(str(ref))
    tensors = {t.name: t for t in manifest.tensors}
    big = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]  # (64, 8): 2048 bytes
    small = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]  # (32, 8): 1024 bytes
    lying = dataclasses.replace(manifest, tensors=tuple(
        dataclasses.replace(t, digest=big.digest) if t.name == small.name else t for t in manifest.tensors))
    v2, created = registry.backend.publish("sql", lying.at(2, manifest.created).to_json())
    assert created and v2.version == 2
    with pytest.raises(IntegrityError, match=f"blob {big.digest} .*declares 2048 raw bytes but its descriptor says 1024"):
        registry.load("sql@v2")
    problems = registry.verify().problems
    assert problems == (f"sql@v2: tensor {small.name} blob {big.digest} holds 2048 bytes but the manifest's "
                        "descriptor says 1024 (the blob is intact, the manifest is wrong); re-push the adapter",)


def test_a_manifest_claiming_another_task_is_refused_and_reported(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.push(make_adapter(), "sql")
    (tmp_path / "refs" / "chat" / "versions").mkdir(parents=True)
    (tmp_path / "refs" / "chat" / "versions" / "1").write_text(ref.digest + "\n")
    with pytest.raises(IntegrityError, match="belongs to task 'sql' but is stored under task 'chat'"):
        registry.load("chat@v1")
    problems = registry.verify().problems
    assert len(problems) == 1 and problems[0].startswith(f"chat@v1: manifest {ref.digest}: the manifest belongs "
                                                         "to task 'sql' but is stored under task 'chat'")


def test_verify_reports_dangling_tags_and_a_corrupt_removed_max(tmp_path):
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    v2 = registry.push(make_adapter(1), "sql", tags=["prod"])
    nowhere = Digest.of(b"no such manifest")
    (tmp_path / "refs" / "sql" / "tags" / "old").write_text(nowhere + "\n")
    registry.remove("sql@v2")
    (tmp_path / "refs" / "sql" / "tags" / "stale").write_text(v2.digest + "\n")  # its version was removed
    (tmp_path / "refs" / "sql" / "removed-max").write_text("two\n")
    problems = registry.verify().problems
    assert [p for p in problems if "dangling tag" in p] == [
        f"sql:old: names manifest {nowhere}, which is not a version of 'sql' (a dangling tag); point it at a "
        "version with 'adapterhub tag sql@vN old' or remove it with 'adapterhub rm sql:old'",
        f"sql:stale: names manifest {v2.digest}, which is not a version of 'sql' (a dangling tag); point it at a "
        "version with 'adapterhub tag sql@vN stale' or remove it with 'adapterhub rm sql:stale'"]
    assert any("removed-max" in p and "'two'" in p for p in problems) and len(problems) == 3


# --- gc -----------------------------------------------------------------------------------------


def test_gc_never_reads_garbage_blobs(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.push(make_adapter(1), "sql")
    registry.remove("sql@v1")
    garbage = {digest for digest, _ in registry.gc().blobs}
    assert len(garbage) == 9  # 8 tensors + 1 manifest; the config blob is shared with v2
    bomb = sorted(garbage)[0]
    _path(tmp_path, bomb).write_bytes(blob_file(zstd_rle_frame(GIB2, BOMB_BLOCKS), GIB2))
    read = []
    original = BlobStore.get
    monkeypatch.setattr(BlobStore, "get", lambda self, digest, size=None: read.append(digest) or original(
        self, digest, size))
    result = registry.gc(dry_run=False)
    assert set(result.removed_blobs) == garbage and read and garbage.isdisjoint(read)


def test_gc_stops_on_an_unreadable_ref_file(tmp_path):
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.push(make_adapter(1), "sql")
    (tmp_path / "refs" / "sql" / "versions" / "1").write_text("not a digest\n")
    before = store_tree(tmp_path)
    for dry_run in (True, False):
        with pytest.raises(IntegrityError, match="gc stopped: .*refs/sql/versions/1"):
            registry.gc(dry_run=dry_run)
    assert store_tree(tmp_path) == before


def test_a_missing_blob_is_reported_by_name(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.push(make_adapter(), "sql")
    tensor = registry.manifest(str(ref)).tensors[3]
    _path(tmp_path, tensor.digest).unlink()
    with pytest.raises(BlobNotFoundError, match=tensor.digest):
        registry.load(str(ref))
    report = registry.verify()
    assert report.problems == (f"sql@v1: tensor {tensor.name} blob {tensor.digest} is missing; rewrite it with "
                               "'adapterhub verify --repair SOURCE' (a PEFT directory or another registry that has "
                               "it), or re-push the adapter",)
    assert [(need.digest, need.size, need.width, need.role) for need in report.damaged] == [
        (tensor.digest, tensor.size, 4, f"tensor {tensor.name} of sql@v1")]
