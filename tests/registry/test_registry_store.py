"""Local store: exact PEFT round trips, dedup, refs, integrity, gc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from adapterhub import Registry
from adapterhub.adapter import Adapter, RawTensor, read_safetensors
from adapterhub.errors import (
    AdapterFormatError, ConfigError, FormatVersionError, IntegrityError, InvalidNameError, RefNotFoundError,
)
from adapterhub.registry import blobs
from tests.registry.helpers import blob_files, make_adapter


@pytest.mark.parametrize("use_dora, dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_peft_dir_push_pull_is_byte_identical(tmp_path, use_dora, dtype):
    source = make_adapter(use_dora=use_dora, dtype=dtype).save_peft_dir(tmp_path / "src")
    registry = Registry(tmp_path / "store")
    ref = registry.push(source, "sql")
    assert str(ref) == "sql@v1"
    out = registry.pull("sql@v1", tmp_path / "out")
    original, _ = read_safetensors((source / "adapter_model.safetensors").read_bytes())
    pulled, metadata = read_safetensors((out / "adapter_model.safetensors").read_bytes())
    assert pulled == original and metadata == {"format": "pt"}
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (source / "adapter_config.json").read_text())
    assert any("lora_magnitude_vector" in k for k in pulled) is use_dora


def test_repush_adds_no_blob_and_one_changed_tensor_adds_one(tmp_path):
    registry = Registry(tmp_path)
    adapter = make_adapter(use_dora=True)
    registry.push(adapter, "sql")
    before = blob_files(tmp_path)
    assert str(registry.push(adapter, "sql")) == "sql@v1"  # same content: same version, nothing stored
    assert blob_files(tmp_path) == before
    key = sorted(adapter.tensors)[0]
    changed = adapter.tensors[key].to_float32().copy()
    changed[0, 0] += 1.0
    tensors = {**adapter.tensors, key: RawTensor.from_array(changed)}
    assert str(registry.push(Adapter(adapter.config, tensors), "sql")) == "sql@v2"
    added = set(blob_files(tmp_path)) - set(before)
    manifest = registry.manifest("sql@v2")
    tensor_blobs = {t.digest.hex for t in manifest.tensors}
    assert len(added) == 2 and added - tensor_blobs == {registry.resolve("sql@v2").digest.hex}  # 1 tensor + manifest
    assert len(added & tensor_blobs) == 1
    assert registry.diff("sql@v1", "sql@v2").changed[0][0] == key


def test_refs_tags_latest_and_digests(tmp_path):
    registry = Registry(tmp_path)
    v1 = registry.push(make_adapter(0), "sql", tags=["prod"])
    v2 = registry.push(make_adapter(1), "sql", annotations={"eval.acc": 0.91, "note": "second"})
    assert [str(registry.resolve(r)) for r in ("sql", "sql:latest", "sql:prod", f"sql@{v1.digest}")] == [
        "sql@v2", "sql@v2", "sql@v1", "sql@v1"]
    registry.tag("sql@v2", "prod")
    assert registry.resolve("sql:prod") == v2
    log = registry.log("sql")
    assert [str(e.ref) for e in log] == ["sql@v2", "sql@v1"] and log[0].tags == ("prod",)
    assert log[0].annotations == {"eval.acc": "0.91", "note": "second"}
    assert registry.tasks() == ["sql"] and registry.versions("sql") == [1, 2]
    registry.remove("sql@v2")
    assert str(registry.resolve("sql")) == "sql@v1" and "prod" not in registry.tags("sql")
    with pytest.raises(RefNotFoundError, match="versions of sql: \\[1\\]"):
        registry.resolve("sql@v2")
    with pytest.raises(RefNotFoundError, match="no versions"):
        registry.resolve("other")


def test_load_returns_the_same_adapter(tmp_path):
    registry = Registry(tmp_path)
    adapter = make_adapter(use_dora=True, dtype="bfloat16")
    loaded = registry.load(str(registry.push(adapter, "chat")))
    assert loaded.tensors == adapter.tensors and loaded.config.to_dict() == adapter.config.to_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(loaded.modules()[q].lora_B, adapter.modules()[q].lora_B)


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "Sql", "sql\n", "sq l", "", "x" * 65, "sql\x00"])
def test_bad_task_names(tmp_path, name):
    with pytest.raises(InvalidNameError, match="not allowed"):
        Registry(tmp_path).push(make_adapter(), name)
    assert not (tmp_path / "refs").exists()


@pytest.mark.parametrize("tag, fragment", [("a/b", "not allowed"), ("x..y", "not allowed"), ("v3", "reserved"),
                                           ("latest", "reserved"), ("-x", "not allowed"), ("p\td", "not allowed")])
def test_bad_tags(tmp_path, tag, fragment):
    with pytest.raises(InvalidNameError, match=fragment):
        Registry(tmp_path).push(make_adapter(), "sql", tags=[tag])


def test_bad_adapter_dirs_write_nothing(tmp_path):
    src = make_adapter().save_peft_dir(tmp_path / "src")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="never loads"):
        Registry(tmp_path / "store").push(src, "sql")
    with pytest.raises(ConfigError, match="reserved"):
        Registry(tmp_path / "store").push(make_adapter(), "sql", annotations={"org.adapterhub.task": "x"})
    assert not (tmp_path / "store").exists()


def _stored(tmp_path, digest):
    return tmp_path / "blobs" / "sha256" / digest.hex


def test_every_flipped_byte_fails_pull_naming_the_blob(tmp_path):
    registry = Registry(tmp_path / "store")
    ref = registry.push(make_adapter(use_dora=True), "sql")
    manifest = registry.manifest(str(ref))
    digests = [ref.digest, manifest.config_digest] + [t.digest for t in manifest.tensors]
    rng = np.random.default_rng(0)
    for digest in digests:
        path = _stored(tmp_path / "store", digest)
        good = path.read_bytes()
        for position in rng.choice(len(good), size=3, replace=False):
            bad = bytearray(good)
            bad[position] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(bad))
            dest = tmp_path / "out"
            with pytest.raises(IntegrityError, match=digest):
                registry.pull(str(ref), dest)
            assert not dest.exists()
            report = registry.verify()
            assert not report.ok and any(digest in p for p in report.problems)
        path.write_bytes(good)
    assert registry.verify().ok


def test_oversize_and_truncated_frames_are_rejected(tmp_path):
    raw = np.arange(1024, dtype=np.float32).tobytes()
    encoded = blobs.encode(raw, 4)
    header = encoded[:24]
    bigger = zstandard.ZstdCompressor().compress(raw + raw)  # frame declares 2x the header's size
    with pytest.raises(IntegrityError, match="declares 8192 bytes but the blob header says 4096"):
        blobs.decode(header + bigger, "blob x")
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw + raw)
    with pytest.raises(IntegrityError, match="declares"):
        blobs.decode(header + unsized, "blob x")
    with pytest.raises(IntegrityError, match="corrupt or truncated|decompressed to"):
        blobs.decode(encoded[:-7], "blob x")
    assert blobs.decode(encoded, "blob x") == raw


def test_blob_file_is_a_zstd_file_whose_content_hashes_to_its_name(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.push(make_adapter(), "sql")
    manifest_path = _stored(tmp_path, ref.digest)
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(manifest_path.read_bytes()[24:])
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == ref.digest  # what `zstd -dc | sha256sum` checks
    for digest in registry.manifest(str(ref)).blobs():
        assert hashlib.sha256(blobs.decode(_stored(tmp_path, digest[0]).read_bytes(), "")).hexdigest() == digest[0].hex


def test_format_version_is_checked_first(tmp_path):
    Registry(tmp_path).push(make_adapter(), "sql")
    (tmp_path / "adapterhub-layout").write_text('{"formatVersion": 9}')
    with pytest.raises(FormatVersionError, match="formatVersion 9"):
        Registry(tmp_path)


def test_gc_frees_only_unreferenced_blobs(tmp_path):
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.push(make_adapter(1), "sql")
    assert registry.gc(dry_run=True).expected_freed_bytes == 0
    registry.remove("sql@v1")
    plan = registry.gc(dry_run=True)
    assert len(plan.blobs) == 9  # 8 tensors + the manifest; the config blob is shared with v2
    assert plan.expected_freed_bytes == sum(_stored(tmp_path, d).stat().st_size for d, _ in plan.blobs)
    assert "delete blob" in plan.describe() and "expected to be freed" in plan.describe()
    result = registry.gc(dry_run=False)
    assert result.freed_bytes == result.plan.expected_freed_bytes > 0 and result.skipped == 0
    assert sorted(result.removed_blobs) == sorted(d for d, _ in plan.blobs)
    assert registry.gc(dry_run=True).blobs == () and registry.verify().ok
    assert registry.load("sql").tensors == make_adapter(1).tensors
    assert registry.backend.execute_gc(result.plan).freed_bytes == 0  # a stale plan frees nothing twice


def test_gc_counts_only_the_files_it_removed(tmp_path, monkeypatch):
    """Blobs another process removed, before gc's checks or between its check and its unlink, are not freed
    by this gc, so they are not in its result; the plan still shows what it expected."""
    from adapterhub.registry import gc
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.push(make_adapter(1), "sql")
    registry.remove("sql@v1")
    (tmp_path / "tmp" / ".orphan.tmp").write_bytes(b"x" * 100)  # left by a push killed mid-write
    plan = registry.gc(dry_run=True)
    (gone, gone_size), (racing, racing_size) = plan.blobs[:2]
    assert len(plan.blobs) == 9 and plan.temp_files[0][1] == 100
    _stored(tmp_path, gone).unlink()
    checked = gc._older

    def removed_after_the_check(path, created):
        is_older = checked(path, created)
        if str(path) == str(_stored(tmp_path, racing)):
            os.unlink(path)
        return is_older

    monkeypatch.setattr(gc, "_older", removed_after_the_check)
    result = registry.backend.execute_gc(plan)
    assert result.freed_bytes == plan.expected_freed_bytes - gone_size - racing_size
    assert set(result.removed_blobs) == {d for d, _ in plan.blobs} - {gone, racing}
    assert result.removed_temp_files == (str(tmp_path / "tmp" / ".orphan.tmp"),) and result.skipped == 2
    assert result.describe().startswith(f"freed {result.freed_bytes} bytes (7 blobs, 1 temp files); the plan "
                                        f"expected {plan.expected_freed_bytes} bytes")


def test_gc_keeps_a_blob_re_referenced_after_the_plan(tmp_path):
    from adapterhub.registry import gc
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.remove("sql@v1")
    plan = gc.plan_gc(registry.backend)
    assert plan.blobs
    registry.push(make_adapter(0), "sql")  # a concurrent push re-uses the planned blobs
    gc.execute_gc(registry.backend, plan)
    assert registry.verify().ok and registry.load("sql@v2").tensors == make_adapter(0).tensors


def test_copy_between_local_registries_moves_only_missing_blobs(tmp_path):
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    a.push(make_adapter(0), "sql")
    a.push(make_adapter(0, r=4), "sql")
    assert str(a.copy("sql@v2", b, progress=False)) == "sql@v2"
    first = len(blob_files(tmp_path / "b"))
    a.copy("sql@v1", tmp_path / "b")
    assert len(blob_files(tmp_path / "b")) - first == len(blob_files(tmp_path / "a")) - first
    assert b.resolve("sql@v1") == a.resolve("sql@v1") and b.verify().ok
    assert b.load("sql@v1").tensors == a.load("sql@v1").tensors


def test_registry_never_imports_torch():
    code = ("import adapterhub, sys; from adapterhub import Registry; import adapterhub.registry.gc; "
            "import adapterhub.registry.oci; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gc_waits_for_a_push_in_flight(tmp_path):
    import threading
    registry = Registry(tmp_path)
    registry.push(make_adapter(0), "sql")
    registry.remove("sql@v1")
    plan = registry.gc(dry_run=True)
    done = threading.Event()
    with registry.backend.session():  # what every push holds from its first blob to its last ref
        worker = threading.Thread(target=lambda: (registry.gc(dry_run=False), done.set()))
        worker.start()
        assert not done.wait(0.3) and all(registry.backend.blobs.has(d) for d, _ in plan.blobs)
    worker.join(timeout=30)
    assert done.is_set() and not any(registry.backend.blobs.has(d) for d, _ in plan.blobs)
