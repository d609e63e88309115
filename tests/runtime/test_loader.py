"""Loading bases: config.json parsing, safetensors dirs (sharded or not), hub ids from the local HF cache,
and the clear errors for what is refused (unsupported architectures, pickle, missing files, other quantizations)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapterhub.errors import ModelLoadError
from adapterhub.runtime import load_base
from adapterhub.runtime.config import ModelConfig
from conftest import FAMILIES, family_weights


def test_config_reads_family_defaults():
    llama, mistral, qwen = (ModelConfig.from_hf_json(FAMILIES[f]) for f in ("llama", "mistral", "qwen2"))
    assert llama.attention_bias and llama.has_o_bias and llama.rope_scaling.factor == 8.0
    assert (llama.num_key_value_heads, llama.head_dim, llama.rope_theta) == (2, 16, 500.0)
    assert mistral.head_dim == 32 and not mistral.attention_bias and mistral.num_key_value_heads == 1
    assert qwen.attention_bias and not qwen.has_o_bias and qwen.tie_word_embeddings  # Qwen2: q/k/v bias only
    assert llama.eos_token_id == (257,)
    # transformers 5 nests theta and scaling in rope_parameters; a list of eos ids stays a list.
    v5 = {k: v for k, v in FAMILIES["llama"].items() if k not in ("rope_scaling", "rope_theta")}
    v5.update(rope_parameters={**FAMILIES["llama"]["rope_scaling"], "rope_theta": 500.0}, eos_token_id=[1, 2])
    c = ModelConfig.from_hf_json(v5)
    assert (c.rope_theta, c.rope_scaling, c.eos_token_id) == (500.0, llama.rope_scaling, (1, 2))
    assert ModelConfig.from_hf_json(llama.to_hf_json()) == llama


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quant_method='gptq'"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}),
     "bnb_4bit_quant_type='fp4'"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}), "load_in_4bit=None"),
])
def test_config_refusals_name_the_problem(change, message):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf_json({**FAMILIES["llama"], **change})


def test_bnb_nf4_quantization_config_is_recognised():
    q = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
         "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    c = ModelConfig.from_hf_json({**FAMILIES["llama"], "quantization_config": q})
    assert c.quantization.use_double_quant and c.quantization.compute_dtype == "bfloat16"


def _state(base):
    return {k: v for k, v in base.model.state_dict().items()}


def test_sharded_and_single_file_dirs_load_the_written_weights(family, checkpoint_dir):
    single = load_base(checkpoint_dir(family, seed=2, name="one"), quantize=None, compute_dtype=torch.float32)
    sharded_dir = checkpoint_dir(family, seed=2, max_shard_bytes=40_000, name="many")
    assert len(set(json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    sharded = load_base(sharded_dir, quantize=None, compute_dtype=torch.float32)
    weights = family_weights(family, seed=2)
    for name, t in _state(single).items():
        assert torch.equal(t, _state(sharded)[name]), name
        if name in weights:
            assert torch.equal(t, weights[name]), name
    if single.config.tie_word_embeddings:
        assert single.model.lm_head.weight is single.model.model.embed_tokens.weight


def test_bf16_checkpoint_loads_in_any_compute_dtype(checkpoint_dir):
    from adapterhub.runtime.tiny import random_checkpoint
    from conftest import family_config

    path = random_checkpoint(checkpoint_dir("llama").parent / "bf16", family_config("llama"), seed=0,
                             dtype=torch.bfloat16, std=0.15)
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    want = family_weights("llama")["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(base.model.get_submodule("model.layers.1.mlp.up_proj").weight, want)


def test_missing_and_refused_files(checkpoint_dir, tmp_path):
    path = checkpoint_dir("llama")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(path, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_base(no_weights, quantize=None)
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle.*never read.*safe_serialization"):
        load_base(no_weights, quantize=None)
    no_config = tmp_path / "no_config"
    shutil.copytree(path, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base(no_config, quantize=None)
    bigger = tmp_path / "bigger"
    shutil.copytree(path, bigger)
    (bigger / "config.json").write_text(json.dumps({**FAMILIES["llama"], "intermediate_size": 128}))
    with pytest.raises(ModelLoadError, match=r"mlp.gate_proj.weight' has shape \[96, 64\] but config.json implies \[128, 64\]"):
        load_base(bigger, quantize=None)
    fewer = tmp_path / "fewer"
    shutil.copytree(path, fewer)
    (fewer / "config.json").write_text(json.dumps({**FAMILIES["llama"], "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="lacks tensor 'model.layers.2"):
        load_base(fewer, quantize=None)
    with pytest.raises(ModelLoadError, match="quantize='int8'"):
        load_base(path, quantize="int8")


def test_missing_shard_is_named(checkpoint_dir):
    path = checkpoint_dir("mistral", max_shard_bytes=40_000)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shard.name}"):
        load_base(path, quantize=None)


def test_hub_id_resolves_from_the_local_cache_only(checkpoint_dir, tmp_path, monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*huggingface-cli download org/tiny"):
        load_base("org/tiny", quantize=None)
    # The cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = cache / "models--org--tiny"
    commit = "0" * 40
    shutil.copytree(checkpoint_dir("qwen2", seed=5), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    base = load_base("org/tiny", quantize=None, compute_dtype=torch.float32)
    assert torch.equal(base.model.model.embed_tokens.weight, family_weights("qwen2", seed=5)["model.embed_tokens.weight"])
    with pytest.raises(ModelLoadError, match="neither a checkpoint dir nor a hub id"):
        load_base(str(tmp_path / "not" / "here"), quantize=None)
