"""Scripting habits of every command (docs/cli.md): --json prints one documented JSON document, --quiet only the
result's identifiers, no progress bars into a pipe, and a registry location that cannot be meant is an error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.adapter import random_adapter
from adapterhub.cli import main
from adapterhub.cli import options
from adapterhub.registry.backend import open_backend
from tests.registry.helpers import assert_one_line_error, make_adapter

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) is ok, result.output
    return result


def as_json(*args):
    value = json.loads(run(*args, "--json").stdout)
    documented(args[0], value)
    return value


@pytest.fixture
def store(tmp_path, monkeypatch):
    """sql@v1 (tagged prod) and sql@v2 in $ADAPTERHUB_HOME; returns (home, the two PEFT dirs)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    dirs = [make_adapter(seed).save_peft_dir(tmp_path / f"a{seed}") for seed in (0, 1)]
    run("push", dirs[0], "sql", "--tag", "prod", "-a", "eval.acc=0.9")
    run("push", dirs[1], "sql")
    return home, dirs


def test_every_registry_command_prints_json_with_its_documented_keys(store, tmp_path):
    home, dirs = store
    reg = Registry(home)
    v2 = reg.resolve("sql@v2")

    pushed = as_json("push", make_adapter(2).save_peft_dir(tmp_path / "a2"), "chat", "-t", "prod")
    assert pushed == {"ref": "chat@v1", "task": "chat", "version": 1, "digest": reg.resolve("chat@v1").digest,
                      "tags": ["prod"], "base": None}
    pulled = as_json("pull", "sql:prod", "-o", tmp_path / "out")
    assert pulled == {"ref": "sql@v1", "digest": reg.resolve("sql@v1").digest, "path": str(tmp_path / "out"),
                      "files": ["adapter_config.json", "adapter_model.safetensors"]}
    assert as_json("ls") == [{"task": "chat", "versions": 1, "latest": 1}, {"task": "sql", "versions": 2, "latest": 2}]
    listed = as_json("ls", "sql")
    assert [e["ref"] for e in listed] == ["sql@v2", "sql@v1"] and listed == as_json("log", "sql")
    shown = as_json("show", "sql@v2")
    assert shown["digest"] == v2.digest and shown["summary"]["tensors"] == 8 and shown["base"] is None
    assert as_json("tag", "sql@v2", "stable") == {"ref": "sql@v2", "tag": "sql:stable", "digest": v2.digest}
    diffed = as_json("diff", "sql@v1", "sql@v2")
    assert diffed["identical"] is False and len(diffed["tensors"]) == 8
    assert {t["change"] for t in diffed["tensors"]} == {"changed"}
    assert as_json("diff", "sql@v1", "sql@v1")["identical"] is True
    copied = as_json("copy", "sql@v2", "--to", tmp_path / "other")
    carried = sorted(tag for tag, at in reg.tags("sql").items() if at.digest == v2.digest)
    assert "stable" in carried  # the tag set above travels with the version
    assert copied == {"ref": "sql@v2", "digest": v2.digest, "to": str(tmp_path / "other"), "tags": carried}
    assert as_json("rm", "chat@v1") == {"removed": "chat@v1"}
    planned = as_json("gc", "--dry-run")
    assert planned["dry_run"] is True and planned["blobs"] == 9 and planned["bytes"] == reg.gc().expected_freed_bytes
    collected = as_json("gc")
    assert collected["dry_run"] is False and collected["blobs"] == 9 and collected["bytes"] == planned["bytes"]
    verified = as_json("verify")
    assert verified["ok"] is True and verified["problems"] == [] and verified["refs_checked"] > 0


def test_verify_json_reports_problems_and_exits_non_zero(store):
    home, _ = store
    manifest = Registry(home).manifest("sql@v1")
    blob = home / "blobs" / "sha256" / manifest.tensors[0].digest.split(":")[1]
    blob.write_bytes(b"broken")
    result = run("verify", "--json", ok=False)
    report = json.loads(result.stdout)
    assert report["ok"] is False and any(manifest.tensors[0].digest in p for p in report["problems"])


def test_generate_merge_and_combine_print_json(store, tmp_path):
    from adapterhub.runtime import load_base

    base = load_base("tiny", quantize=None)
    tiny_dir = random_adapter(base.module_shapes(), r=4, seed=9).save_peft_dir(tmp_path / "tiny-adapter")
    run("push", tiny_dir, "tinytask")
    generated = as_json("generate", "--adapter", "tinytask", "-n", "3", "--quantize", "none", "Hello")
    base.add_adapter(tiny_dir.resolve())
    want = base.generate("Hello", adapters=["tiny-adapter"], max_new_tokens=3)[0]
    assert generated["token_ids"] == want.token_ids and generated["text"] == want.text
    assert generated["completion_tokens"] == len(want.token_ids) and generated["prompt_tokens"] == want.prompt_tokens
    assert generated["finish_reason"] == want.finish_reason and generated["adapter"] == "tinytask"
    combined = as_json("combine", "sql@v1", "sql@v2", "--task", "mix")
    assert combined["ref"] == "mix@v1" and json.loads(combined["annotations"]["combine.sources"]) == ["sql@v1", "sql@v2"]
    merged = as_json("merge", "tinytask", "--base", "tiny", "-o", tmp_path / "merged")
    assert merged["path"] == str(tmp_path / "merged") and merged["sources"][0]["ref"] == "tinytask@v1"


def test_quiet_prints_only_identifiers(store, tmp_path):
    home, dirs = store
    assert run("push", dirs[0], "other", "-q").stdout == "other@v1\n"
    assert run("pull", "sql@v2", "-o", tmp_path / "p", "-q").stdout == f"{tmp_path / 'p'}\n"
    assert run("ls", "-q").stdout == "other\nsql\n"
    assert run("log", "sql", "-q").stdout == "sql@v2\nsql@v1\n"
    assert run("tag", "sql@v1", "x", "-q").stdout == "sql@v1\n"
    assert run("gc", "--dry-run", "-q").stdout == "" and run("verify", "-q").stdout == ""
    assert run("copy", "sql@v1", "--to", tmp_path / "o", "-q").stdout == "sql@v1\n"


def test_no_progress_bar_into_a_pipe(store, monkeypatch, tmp_path):
    _, dirs = store
    result = run("push", dirs[0], "piped")
    assert result.stderr == "" and result.stdout == "piped@v1\n"

    class Tty:
        def __init__(self, is_tty):
            self.is_tty = is_tty

        def isatty(self):
            return self.is_tty

    for out, err, expected in ((True, True, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(options.sys, "stdout", Tty(out))
        monkeypatch.setattr(options.sys, "stderr", Tty(err))
        assert options.show_progress(False, False) is expected
        assert options.show_progress(True, False) is False and options.show_progress(False, True) is False


def test_a_missing_local_registry_is_an_error_for_reading_commands(store, tmp_path):
    missing = tmp_path / "no-such-store"
    for args in (["ls"], ["ls", "sql"], ["log", "sql"], ["show", "sql@v1"], ["pull", "sql@v1", "-o", tmp_path / "x"],
                 ["verify"], ["gc", "--dry-run"], ["diff", "sql@v1", "sql@v2"], ["copy", "sql@v1", "--to", tmp_path]):
        result = run(*args, "-r", missing, ok=False)
        assert_one_line_error(result.exit_code, result.output, "RegistryError", str(missing), "does not exist")
    assert not missing.exists()
    _, dirs = store
    assert run("push", dirs[0], "sql", "-r", missing).stdout == "sql@v1\n"  # a push creates a new store


def test_an_http_location_is_an_error_and_oci_still_parses(store):
    for location in ("http://registry.example:5000/ns", "https://registry.example/ns"):
        result = run("ls", "-r", location, ok=False)
        assert_one_line_error(result.exit_code, result.output, "RegistryError", location, "oci://")
    assert open_backend("oci://127.0.0.1:5000/team").location == "oci://127.0.0.1:5000/team"


def test_every_command_with_json_is_documented_with_its_keys():
    """docs/cli.md has a section per command printing a result, and shows each key the command prints."""
    text = DOCS.read_text()
    with_json = sorted(name for name, command in main.commands.items()
                       if any(p.name == "as_json" for p in command.params))
    assert with_json == sorted(["push", "pull", "ls", "show", "log", "tag", "diff", "rm", "gc", "verify", "copy",
                                "generate", "merge", "combine", "train", "plan"])
    for name in with_json:
        assert re.search(rf"^### `adapterhub {name}", text, re.M), name
        assert any(p.name == "quiet" for p in main.commands[name].params), name


def documented(command: str, value) -> None:
    """Every key of `value` (an object, or the objects of a list) appears in command's section of docs/cli.md."""
    section = re.search(rf"^### `adapterhub {command}`?.*?(?=^### |\Z)", DOCS.read_text(), re.M | re.S).group(0)
    for record in value if isinstance(value, list) else [value]:
        for key in record:
            assert f'"{key}"' in section, (command, key)
