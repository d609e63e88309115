"""`adapterhub combine` and `adapterhub merge` through click's CliRunner, with $ADAPTERHUB_HOME in tmp.

The base is the tiny Llama of tests/runtime/model_fixtures.py (GQA, attention bias) written as a Hugging Face
checkpoint; the adapters are random PEFT LoRAs with non-zero lora_B, pushed to the registry.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.adapter import random_adapter
from adapterhub.cli import main
from adapterhub.runtime import combine, load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from tests.runtime.model_fixtures import family_config

# fp32 logits of the merged checkpoint vs the base with the adapter unmerged: x (W + s B A) against
# x W + s (x A^T) B^T, the same numbers summed in another order.
MERGED_VS_UNMERGED = 1e-4
IDS = torch.tensor([[256, 72, 105, 33, 10, 7], [256, 1, 2, 3, 4, 5]])


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert (result.exit_code == 0) is ok, result.output
    return result


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A base checkpoint dir and two LoRA adapters pushed as sql@v1 (q/v, r=4) and chat@v1 (all-linear, r=4)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a bare ref is ambiguous when a directory of that name is here
    base_dir = random_checkpoint(tmp_path / "base", family_config("llama"), seed=0, std=0.15)
    shapes = load_base(base_dir, quantize=None, compute_dtype=torch.float32).module_shapes()
    registry = Registry(home)
    for task, seed, targets in (("sql", 1, ("q_proj", "v_proj")), ("chat", 2, "all-linear")):
        adapter = random_adapter(shapes, r=4, seed=seed, target_modules=targets)
        assert all(np.any(m.lora_B != 0) for m in adapter.modules().values())  # not a no-op
        registry.push(adapter, task)
    return SimpleNamespace(home=home, base=base_dir, registry=registry, tmp=tmp_path)


def combine_json(*args):
    return json.loads(run("combine", "sql@v1", "chat@v1", *args).stdout)


def test_combine_pushes_the_next_version_with_its_lineage(world):
    out = combine_json("--weights", "0.7,0.3", "--task", "mix", "--tag", "prod", "--json")
    resolved = world.registry.resolve("mix:prod")
    assert (out["ref"], out["digest"]) == ("mix@v1", resolved.digest)
    digests = [world.registry.resolve(ref).digest for ref in ("sql@v1", "chat@v1")]
    expected = {"combine.sources": json.dumps(["sql@v1", "chat@v1"]), "combine.digests": json.dumps(digests),
                "combine.weights": "[0.7, 0.3]", "combine.method": "linear"}
    assert out["annotations"] == expected == dict(world.registry.manifest("mix@v1").annotations)
    combined = combine([world.registry.load("sql@v1"), world.registry.load("chat@v1")], [0.7, 0.3])
    assert world.registry.load("mix@v1").tensors == combined.tensors

    shown = run("show", "mix:prod").stdout
    assert f"note     combine.digests = {json.dumps(digests)}" in shown and "combine.weights = [0.7, 0.3]" in shown

    dare = combine_json("--method", "dare", "--density", "0.5", "--seed", "3", "--task", "mix", "--json")
    assert dare["ref"] == "mix@v2" and dare["annotations"]["combine.seed"] == "3"
    assert dare["annotations"]["combine.density"] == "0.5" and dare["annotations"]["combine.weights"] == "[0.5, 0.5]"
    assert run("combine", "sql", "./missing-dir", "--task", "mix", ok=False).output.count("\n") == 1
    assert run("combine", "sql@v1", "chat@v1", "--task", "mix").stdout == "mix@v3\n"


def test_merge_writes_a_checkpoint_whose_logits_are_the_adapter_unmerged(world):
    combine_json("--weights", "0.7,0.3", "--task", "mix", "--json")
    out = json.loads(run("merge", "mix@v1", "--base", world.base, "-o", world.tmp / "out", "--dtype", "fp32",
                         "--json").stdout)
    assert (out["path"], out["dtype"], out["quantize"], out["merged"]) == (str(world.tmp / "out"), "float32", None,
                                                                         "mix@v1")
    assert out["sources"] == [{"ref": "mix@v1", "digest": world.registry.resolve("mix@v1").digest}]
    assert out["combine"] is None and out["merge"]["modules"] == 14 and out["merge"]["warning"] is None
    assert {f.name: f.stat().st_size for f in (world.tmp / "out").iterdir()} == out["files"]
    assert out["bytes"] == sum(out["files"].values()) and "model.safetensors" in out["files"]

    base = load_base(world.base, quantize=None, compute_dtype=torch.float32)
    base.add_adapter("mix@v1", registry=world.registry)
    unmerged, plain = base(IDS, adapters=["mix@v1"] * 2), base(IDS)
    merged = load_base(world.tmp / "out", quantize=None, compute_dtype=torch.float32)(IDS)
    assert (unmerged - plain).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(merged, unmerged, atol=MERGED_VS_UNMERGED, rtol=MERGED_VS_UNMERGED)

    # several refs are combined first, as `combine` does: the same weights on disk
    direct = json.loads(run("merge", "sql@v1", "chat@v1", "-w", "0.7,0.3", "--base", world.base, "-o",
                            world.tmp / "direct", "--dtype", "fp32", "--json").stdout)
    assert direct["combine"] == {"method": "linear", "weights": [0.7, 0.3]} and direct["merged"] == "sql@v1 + chat@v1"
    assert [s["ref"] for s in direct["sources"]] == ["sql@v1", "chat@v1"]
    assert (world.tmp / "direct/model.safetensors").read_bytes() == (world.tmp / "out/model.safetensors").read_bytes()


def test_merge_quantize_nf4_writes_a_4bit_checkpoint(world):
    world.registry.load("sql@v1").save_peft_dir(world.tmp / "sql-peft")
    out = json.loads(run("merge", "./sql-peft", "--base", world.base, "-o", world.tmp / "q", "--quantize", "nf4",
                         "--json").stdout)
    assert (out["quantize"], out["dtype"]) == ("nf4", "bfloat16")
    assert out["sources"] == [{"ref": str(world.tmp / "sql-peft"), "digest": None}]
    quant = json.loads((world.tmp / "q/config.json").read_text())["quantization_config"]
    assert (quant["bnb_4bit_quant_type"], quant["load_in_4bit"], quant["quant_method"]) == ("nf4", True, "bitsandbytes")
    loaded = load_base(world.tmp / "q", quantize=None, compute_dtype=torch.float32)
    assert {layer.weight.format for layer in loaded.model.linears().values()} == {"nf4"}
    assert torch.isfinite(loaded(IDS)).all()


def test_merge_text_output_force_and_a_4bit_base(world):
    (world.tmp / "out").mkdir()
    (world.tmp / "out/stale.txt").write_text("from an older deploy")
    text = run("merge", "./base", "sql@v1", "--base", world.base, "-o", world.tmp / "out", "--force",
               ok=False).output  # "./base" is a directory, not a PEFT adapter
    assert text.count("\n") == 1 and (world.tmp / "out/stale.txt").exists()
    text = run("merge", "sql@v1", "--base", world.base, "-o", world.tmp / "out", "--force").output
    assert "merged sql@v1 into" in text and ": 4 modules" in text and "model.safetensors" in text  # q, v of 2 layers
    assert sorted(f.name for f in (world.tmp / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in world.tmp.iterdir() if p.name.startswith(".out.")]  # no temp dir left

    load_base(world.base, quantize="nf4", compute_dtype=torch.float32).save_quantized(world.tmp / "nf4-base")
    text = run("merge", "sql@v1", "--base", world.tmp / "nf4-base", "-o", world.tmp / "from-nf4").output
    assert "the written weights keep the adapter's delta within" in text and "warning" not in text  # merged in fp32
    text = run("merge", "sql@v1", "--base", world.base, "-o", world.tmp / "nf4-out", "--quantize", "nf4").output
    assert "warning: the checkpoint holds 'sql@v1' only approximately: written in nf4" in text


ERRORS = [
    # (what, arguments after the base / output, what the one line names)
    ("unknown method", ["sql@v1", "chat@v1", "--method", "average"], ["MergeError", "'average'"]),
    ("weights count", ["sql@v1", "chat@v1", "--weights", "0.5,0.3,0.2"], ["MergeError", "2 adapters and 3 weights"]),
    ("weights text", ["sql@v1", "chat@v1", "--weights", "half,half"], ["ConfigError", "--weights"]),
    ("bad dtype", ["sql@v1", "--dtype", "bf17"], ["ConfigError", "'bf17'"]),
    ("bad quantize", ["sql@v1", "--quantize", "int8"], ["ConfigError", "'int8'"]),
    ("missing ref", ["sql@v9"], ["RefNotFoundError", "sql@v9"]),
    ("non-empty output", ["sql@v1", "-o", "{busy}"], ["ConfigError", "--force", "{busy}"]),
]


@pytest.mark.parametrize("what, args, names", ERRORS, ids=[e[0] for e in ERRORS])
def test_merge_errors_are_one_line(world, what, args, names):
    busy = world.tmp / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    values = {"busy": str(busy)}
    output = ["-o", world.tmp / "new"] if "-o" not in args else []
    result = run("merge", *(a.format(**values) for a in args), "--base", world.base, *output, ok=False)
    assert result.output.strip().count("\n") == 0, result.output
    for name in names:
        assert name.format(**values) in result.output, result.output
    assert not (world.tmp / "new").exists() and [p.name for p in busy.iterdir()] == ["keep.txt"]
