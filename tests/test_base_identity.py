"""The base is checked: a version records the identity of the base it was trained on (architecture, config hash,
weight digest; docs/store-format.md "Base identity"), and loading it on another base fails naming both.

Bases A and B are tiny Llamas built and saved by transformers from one config, with other random weights: the
same shapes, so only the identity tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.adapter import random_adapter
from adapterhub.base_identity import BaseIdentity, BaseMismatchWarning, identity_from_checkpoint
from adapterhub.cli import main
from adapterhub.errors import IncompatibleAdapterError
from adapterhub.runtime import load_base
from adapterhub.runtime.model.tiny import byte_tokenizer
from adapterhub.serve.engine import Engine, EngineConfig

pytestmark = pytest.mark.compat
transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128, bos_token_id=256,
              eos_token_id=257, tie_word_embeddings=False)


def _hf_base(path, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(path)
    byte_tokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return _hf_base(root / "base-a", seed=0), _hf_base(root / "base-b", seed=1)


@pytest.fixture
def pushed(bases, tmp_path):
    """A registry holding sql@v1, pushed with --base A: (registry, A, B, the adapter)."""
    a, b = bases
    shapes = load_base(a, quantize=None, compute_dtype=torch.float32).module_shapes()
    adapter = random_adapter(shapes, r=4, seed=3)
    reg = Registry(tmp_path / "store")
    reg.push(adapter, "sql", base=a)
    return reg, a, b, adapter


def test_the_weight_digest_is_sha256_of_the_documented_tensors_in_bf16(bases):
    """Recomputed here with safetensors + torch's own bf16 rounding, as docs/store-format.md defines it."""
    from safetensors.torch import load_file

    a, _ = bases
    tensors = load_file(a / "model.safetensors")
    parts = [tensors["model.embed_tokens.weight"][:16], tensors["model.layers.1.post_attention_layernorm.weight"],
             tensors["model.norm.weight"]]
    raw = b"".join(p.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes() for p in parts)
    identity = identity_from_checkpoint(a)
    assert identity.weights == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert identity.architecture == "LlamaForCausalLM" and identity.name == str(a)


def test_the_config_hash_is_the_canonical_json_of_the_documented_fields(bases):
    a, b = bases
    expected = {"attention_bias": False, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
                "intermediate_size": 128, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4,
                "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_scaling": None,
                "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 259}
    text = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    assert identity_from_checkpoint(a).config == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    ia, ib = identity_from_checkpoint(a), identity_from_checkpoint(b)
    assert ia.config == ib.config and ia.weights != ib.weights  # same shapes, other weights


def test_a_math_field_changes_the_config_hash_and_other_fields_do_not(bases, tmp_path):
    a, _ = bases
    config = json.loads((a / "config.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": 5, "dtype": "bfloat16"}))
    assert identity_from_checkpoint(copy).config == identity_from_checkpoint(a).config
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert identity_from_checkpoint(copy).config != identity_from_checkpoint(a).config


def test_the_runtime_computes_the_identity_the_registry_records(pushed):
    reg, a, _, _ = pushed
    recorded = reg.base("sql@v1")
    loaded = load_base(a, quantize="nf4").identity
    assert recorded == loaded and recorded.weights is not None and recorded.config is not None


def test_an_adapter_loads_on_its_own_base_and_changes_its_output(pushed):
    reg, a, _, _ = pushed
    base = load_base(a, quantize=None, compute_dtype=torch.float32)
    name = base.add_adapter("sql@v1", registry=reg)
    ids = [[256, 72, 105, 33]]
    assert not torch.allclose(base(ids, adapters=[name]), base(ids))  # installed, with non-zero lora_B


def test_an_adapter_on_another_base_fails_naming_both_and_the_override_loads_it(pushed):
    reg, a, b, _ = pushed
    base = load_base(b, quantize=None, compute_dtype=torch.float32)
    with pytest.raises(IncompatibleAdapterError) as caught:
        base.add_adapter("sql@v1", registry=reg)
    message = str(caught.value)
    assert str(a) in message and str(b) in message and "weights differ" in message
    assert "allow_base_mismatch" in message and "\n" not in message
    assert base.pool.names() == []
    with pytest.warns(BaseMismatchWarning, match="loaded anyway"):
        name = base.add_adapter("sql@v1", registry=reg, allow_base_mismatch=True)
    assert base.pool.names() == [name]


def test_a_quantized_copy_of_the_base_is_the_same_base(pushed, tmp_path):
    """save_quantized rewrites config.json (other keys) and stores the embedding in bf16: same identity."""
    reg, a, _, _ = pushed
    load_base(a, quantize="nf4").save_quantized(tmp_path / "a-nf4")
    assert json.loads((tmp_path / "a-nf4" / "config.json").read_text()) != json.loads((a / "config.json").read_text())
    copy = load_base(tmp_path / "a-nf4")
    assert copy.identity.config == reg.base("sql@v1").config and copy.identity.weights == reg.base("sql@v1").weights
    copy.add_adapter("sql@v1", registry=reg)


def test_a_name_only_mismatch_warns_once_naming_both(bases, tmp_path):
    _, b = bases
    base = load_base(b, quantize=None, compute_dtype=torch.float32)
    adapter = random_adapter(base.module_shapes(), r=4, seed=5)
    config = {**adapter.config.to_dict(), "base_model_name_or_path": "org/another-model"}
    reg = Registry(tmp_path / "store")
    reg.push(type(adapter)(config, adapter.tensors), "chat")
    assert reg.base("chat@v1") == BaseIdentity(name="org/another-model")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        base.add_adapter("chat@v1", name="one", registry=reg)
        base.add_adapter("chat@v1", name="two", registry=reg)
    mismatch = [w for w in seen if issubclass(w.category, BaseMismatchWarning)]
    assert len(mismatch) == 1 and "org/another-model" in str(mismatch[0].message) and str(b) in str(mismatch[0].message)
    assert sorted(base.pool.names()) == ["one", "two"]


def test_a_name_that_matches_the_base_does_not_warn(bases, tmp_path):
    _, b = bases
    base = load_base(b, quantize=None, compute_dtype=torch.float32)
    adapter = random_adapter(base.module_shapes(), r=4, seed=5)
    config = {**adapter.config.to_dict(), "base_model_name_or_path": "someone/base-b"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base.add_adapter(type(adapter)(config, adapter.tensors))


def test_the_server_refuses_a_mismatched_adapter_unless_allowed(pushed):
    reg, _, b, _ = pushed
    for allow in (False, True):
        engine = Engine(load_base(b, quantize=None, compute_dtype=torch.float32), reg,
                        EngineConfig(max_batch=2, allow_base_mismatch=allow))
        try:
            resolved = engine.source.resolve("sql@v1")
            if allow:
                with pytest.warns(BaseMismatchWarning, match="weights differ"):
                    assert engine.source.load(resolved).tensors == reg.load("sql@v1").tensors
            else:
                with pytest.raises(IncompatibleAdapterError, match="weights differ"):
                    engine.source.load(resolved)
        finally:
            engine.close()


def test_cli_push_base_then_generate_on_another_base_fails_in_one_line(pushed, tmp_path):
    _, a, b, adapter = pushed
    src = adapter.save_peft_dir(tmp_path / "peft")
    store = tmp_path / "cli-store"
    runner = CliRunner()
    pushed_json = json.loads(runner.invoke(main, ["push", str(src), "sql", "--base", str(a), "-r", str(store),
                                                  "--json"]).output)
    assert pushed_json["base"]["weights_sha256"] == identity_from_checkpoint(a).weights
    args = ["generate", "--base", str(b), "--adapter", "sql@v1", "-r", str(store), "-n", "2", "--quantize", "none",
            "--token-ids", "256,72"]
    failed = runner.invoke(main, args)
    assert failed.exit_code == 1 and failed.output.count("\n") == 1, failed.output
    assert "IncompatibleAdapterError" in failed.output and str(a) in failed.output and str(b) in failed.output
    allowed = runner.invoke(main, [*args, "--allow-base-mismatch", "--json"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["completion_tokens"] == 2
    assert allowed.stderr.count("warning: ") == 1 and str(b) in allowed.stderr
    on_a = runner.invoke(main, ["generate", "--base", str(a), "--adapter", "sql@v1", "-r", str(store), "-n", "2",
                                "--quantize", "none", "--token-ids", "256,72", "--json"])
    assert on_a.exit_code == 0 and on_a.stderr == "", on_a.output
