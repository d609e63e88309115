"""`adapterhub` registry commands through click's CliRunner, with $ADAPTERHUB_HOME in tmp."""

from __future__ import annotations

import json

from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.adapter import read_safetensors
from adapterhub.cli import main
from tests.registry.helpers import make_adapter


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) is ok, result.output
    return result.output


def test_push_pull_ls_show_log_tag_diff(home, tmp_path):
    src1 = make_adapter(0, use_dora=True).save_peft_dir(tmp_path / "a1")
    src2 = make_adapter(1, use_dora=True).save_peft_dir(tmp_path / "a2")
    assert run("push", src1, "sql", "--tag", "prod", "-a", "eval.acc=0.9").strip().endswith("sql@v1")
    assert run("push", src2, "sql").strip().endswith("sql@v2")
    assert Registry(home).versions("sql") == [1, 2]  # $ADAPTERHUB_HOME is the default registry

    out = tmp_path / "pulled"
    assert "sql@v1" in run("pull", "sql:prod", "-o", out)
    assert read_safetensors((out / "adapter_model.safetensors").read_bytes())[0] == \
        read_safetensors((src1 / "adapter_model.safetensors").read_bytes())[0]

    assert run("ls").split("\t")[:2] == ["sql", "2 versions"]
    listing = json.loads(run("ls", "sql", "--json"))
    assert [e["ref"] for e in listing] == ["sql@v2", "sql@v1"] and listing[1]["tags"] == ["prod"]
    assert listing[1]["annotations"] == {"eval.acc": "0.9"}
    shown = json.loads(run("show", "sql@v1", "--json"))
    assert shown["config"]["use_dora"] is True and len(shown["tensors"]) == 12
    assert "DoRA r=8" in run("show", "sql@v1")
    assert "eval.acc: 0.9" in run("log", "sql")
    run("tag", "sql@v2", "prod")
    assert Registry(home).resolve("sql:prod").version == 2
    changed = run("diff", "sql@v1", "sql@v2")
    assert changed.count("~ ") == 12 and "identical" in run("diff", "sql@v1", "sql@v1")


def test_rm_gc_verify_copy(home, tmp_path):
    run("push", make_adapter(0).save_peft_dir(tmp_path / "a"), "chat")
    run("push", make_adapter(1).save_peft_dir(tmp_path / "b"), "chat")
    run("rm", "chat@v1")
    dry = run("gc", "--dry-run")
    expected = Registry(home).gc().expected_freed_bytes
    assert dry.startswith(f"gc plan: 9 unreferenced blobs, 0 temp files, {expected} bytes expected to be freed")
    assert run("gc") == f"freed {expected} bytes (9 blobs, 0 temp files)\n" and Registry(home).gc().blobs == ()
    assert run("verify").startswith("ok: ")
    assert "chat@v2" in run("copy", "chat", "--to", tmp_path / "other")
    assert Registry(tmp_path / "other").load("chat@v2").tensors == make_adapter(1).tensors


def test_log_json_has_the_records_of_ls_json(home, tmp_path):
    run("push", make_adapter(0).save_peft_dir(tmp_path / "a"), "sql", "--tag", "prod", "-a", "eval.acc=0.9")
    run("push", make_adapter(1).save_peft_dir(tmp_path / "b"), "sql")
    records = json.loads(run("log", "sql", "--json"))
    assert [r["ref"] for r in records] == ["sql@v2", "sql@v1"]
    assert all(list(r) == ["annotations", "bytes", "created", "digest", "ref", "tags", "version"] for r in records)
    assert records[1]["tags"] == ["prod"] and records[1]["annotations"] == {"eval.acc": "0.9"}
    assert records[0]["digest"] == str(Registry(home).resolve("sql@v2").digest) and records[0]["bytes"] > 0
    assert records == json.loads(run("ls", "sql", "--json"))
    assert json.loads(run("log", "nothing", "--json")) == []


def test_errors_are_one_line_and_non_zero(home, tmp_path):
    out = run("pull", "nothing@v3", ok=False)
    assert "RefNotFoundError" in out and out.count("\n") == 1
    assert "InvalidNameError" in run("push", make_adapter().save_peft_dir(tmp_path / "a"), "a/b", ok=False)
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.bin").write_bytes(b"x")
    assert "AdapterFormatError" in run("push", bad, "sql", ok=False)
    ref = Registry(home).push(make_adapter(), "sql")
    blob = home / "blobs" / "sha256" / ref.digest.hex
    blob.write_bytes(blob.read_bytes()[:-3])
    result = CliRunner().invoke(main, ["verify"])
    assert result.exit_code == 1 and ref.digest in result.output
