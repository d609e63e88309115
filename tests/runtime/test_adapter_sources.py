"""Where an adapter comes from: one rule for `Base.add_adapter` and `adapterhub generate --adapter`.

A str is a registry ref unless it is clearly a path ("./x", "../x", "/x", "~/x", or holding a "/"); a
`Path` is a path; a bare name that also exists in the working directory is ambiguous and refused with an
error naming both. The runtime never opens a registry itself: refs need the caller's `registry`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub.adapter import Adapter, adapter_source, random_adapter
from adapterhub.cli import main
from adapterhub.errors import ConfigError
from adapterhub.registry import Registry
from adapterhub.runtime import load_base

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base():
    return load_base("tiny", compute_dtype=torch.float32)


@pytest.fixture
def workdir(tmp_path, monkeypatch, base):
    """cwd = tmp with a PEFT dir ./good, and a registry whose task 'good' holds a *different* adapter."""
    monkeypatch.chdir(tmp_path)
    shapes = base.module_shapes()
    random_adapter(shapes, r=4, seed=1).save_peft_dir(tmp_path / "good")
    registry = Registry(tmp_path / "registry")
    registry.push(random_adapter(shapes, r=8, seed=2), "good", tags=("prod",))
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "registry"))
    return tmp_path, registry


def test_the_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    for path in ("./adir", "../x", "/abs/dir", "~/x", "org/name", "."):
        assert isinstance(adapter_source(path), Path), path
    assert adapter_source(Path("sql")) == Path("sql")  # a PathLike is always a path
    for ref in ("sql", "sql:prod", "sql@v3", "sql@sha256:" + "a" * 64):
        assert adapter_source(ref) == ref
    adapter = random_adapter({"model.layers.0.self_attn.q_proj": (8, 8)}, r=2, seed=0)
    assert adapter_source(adapter) is adapter
    with pytest.raises(ConfigError, match=r"'adir' is ambiguous.*\./adir.*'\./adir'.*'adir:latest'"):
        adapter_source("adir")
    with pytest.raises(ConfigError, match="an Adapter, a PEFT directory or a registry ref"):
        adapter_source("")


def test_add_adapter_reads_refs_from_the_given_registry_and_paths_from_disk(workdir, base):
    tmp_path, registry = workdir
    from_dir = Adapter.from_peft_dir(tmp_path / "good")
    assert base.add_adapter("./good") == "good"
    assert base.pool.adapter("good").config.r == from_dir.config.r == 4
    assert base.add_adapter("good:prod", registry=registry) == "good:prod"
    assert base.pool.adapter("good:prod").config.r == 8  # the registry's, not the directory's
    with pytest.raises(ConfigError, match="'good' is ambiguous"):
        base.add_adapter("good", registry=registry)
    with pytest.raises(ConfigError, match="registry ref, and no registry was given"):
        base.add_adapter("good:prod")  # the runtime never builds a registry itself


def test_cli_generate_uses_the_same_rule(workdir):
    def generate(adapter):
        return CliRunner().invoke(main, ["generate", "--adapter", adapter, "-n", "4", "--quantize", "none", "Hi"])

    ambiguous = generate("good")
    assert ambiguous.exit_code != 0 and "'good' is ambiguous" in ambiguous.output
    outputs = {a: generate(a) for a in ("./good", "good:prod")}
    for result in outputs.values():
        assert result.exit_code == 0, result.output
    assert outputs["./good"].output != outputs["good:prod"].output  # two different adapters, as named


def test_the_runtime_never_imports_the_registry():
    code = ("import sys, torch\nfrom adapterhub.runtime import load_base\n"
            "base = load_base('tiny', compute_dtype=torch.float32)\n"
            "base.generate('hi', max_new_tokens=2)\n"
            "print(sorted(m for m in sys.modules if m.startswith('adapterhub.registry')))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
