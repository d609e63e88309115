"""Loading bases: config.json parsing, safetensors dirs (sharded or not), hub ids from the local HF cache,
and the clear errors for what is refused (unsupported architectures, pickle, missing files, other quantizations)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapterhub.errors import ModelLoadError
from adapterhub.runtime import load_base
from adapterhub.runtime.model.config import ModelConfig
from model_fixtures import FAMILIES, family_weights


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
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}),
     "bnb_4bit_quant_type='int4'"),
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
    from adapterhub.runtime.model.tiny import random_checkpoint
    from model_fixtures import family_config

    path = random_checkpoint(checkpoint_dir("llama").parent / "bf16", family_config("llama"), seed=0,
                             dtype=torch.bfloat16, std=0.15)
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    want = family_weights("llama")["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(base.model.get_submodule("model.layers.1.mlp.up_proj").dequantized_weight(), want)


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


# --- NF4: quantize on load, save_quantized, bitsandbytes checkpoints ----------------------------------------

# NF4 tests use 64-aligned in_features, as every real Llama-family size is: whole NF4 blocks per row (the CPU
# kernel's requirement, and bitsandbytes' CPU dequantize is wrong otherwise, semantics §1.5).
BNB_CONFIG = {**FAMILIES["llama"], "intermediate_size": 128}
NF4_KEYS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4")


def test_quantize_on_load_packs_like_the_reference_and_keeps_the_rest_dense(tmp_path):
    from adapterhub.runtime.adapters.linear import AdapterLinear
    from reference import nf4 as ref_nf4

    from adapterhub.runtime.model.tiny import random_checkpoint, random_weights

    config = ModelConfig.from_hf_json(BNB_CONFIG)
    base = load_base(random_checkpoint(tmp_path, config, seed=4, std=0.15), quantize="nf4", compute_dtype=torch.bfloat16)
    weights = random_weights(config, seed=4, std=0.15)
    for name, linear in base.model.linears().items():
        assert linear.weight.format == "nf4", name
        w = weights[name + ".weight"].to(torch.bfloat16)
        sd = linear.weight.state_dict(name + ".")
        want = ref_nf4.quantize(w.float().numpy(), 64, True, "bfloat16")
        assert bytes(sd[name + ".weight"].numpy()) == bytes(want["weight"])  # the 4-bit codes, bit for bit
        alone = AdapterLinear.from_dense(w, dtype=torch.bfloat16, quantize="nf4")
        assert torch.equal(linear.dequantized_weight(), alone.dequantized_weight())
        if linear.bias is not None:  # q/k/v/o biases stay dense
            assert torch.equal(linear.bias, weights[name + ".bias"].to(torch.bfloat16))
        err = (linear.dequantized_weight().float() - w.float()).abs().max()
        assert 0 < err < 0.25 * w.abs().max()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(base.model.get_parameter(name), weights[name].to(torch.bfloat16))


def test_save_quantized_round_trip_is_bit_identical_and_skips_quantizing(checkpoint_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from adapterhub.runtime.model.config import QuantConfig
    from adapterhub.runtime.quant.nf4 import NF4Weight

    from adapterhub.runtime.model.tiny import random_checkpoint

    qwen2 = ModelConfig.from_hf_json({**FAMILIES["qwen2"], "intermediate_size": 128})
    base = load_base(random_checkpoint(tmp_path / "src", qwen2, seed=3, std=0.15), quantize="nf4")
    path = base.save_quantized(tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == QuantConfig().to_hf_json()  # semantics §3.2
    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata == {"format": "pt"}
    q = "model.layers.1.self_attn.q_proj."
    assert {k for k in keys if k.startswith(q)} == {q + s for s in (*NF4_KEYS, "bias")}
    assert "lm_head.weight" not in keys  # tied (Qwen2 config here)

    def refuse(*args, **kwargs):
        raise AssertionError("a saved NF4 base must load without quantizing")

    monkeypatch.setattr(NF4Weight, "quantize", refuse)
    loaded = load_base(path, quantize="nf4")
    for name, linear in base.model.linears().items():
        a, b = linear.weight.state_dict(name + "."), loaded.model.get_submodule(name).weight.state_dict(name + ".")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name, p in base.model.named_parameters():
        assert torch.equal(p, loaded.model.get_parameter(name)), name
    ids = torch.tensor([base.tokenizer.encode("round trip")])
    assert torch.equal(base(ids), loaded(ids))


def test_save_quantized_needs_an_nf4_base(checkpoint_dir, tmp_path):
    from adapterhub.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize='nf4'"):
        load_base(checkpoint_dir("llama"), quantize=None).save_quantized(tmp_path / "q")


def _bnb_model(path, transformers):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                             device_map="cpu")


@pytest.mark.compat
def test_transformers_bnb_checkpoint_loads_as_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from adapterhub.runtime.model.tiny import random_checkpoint

    src = random_checkpoint(tmp_path / "src", ModelConfig.from_hf_json(BNB_CONFIG), seed=1, std=0.15)
    hf = _bnb_model(src, transformers)
    hf.save_pretrained(tmp_path / "bnb")  # before any eval forward (semantics §3.4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / "bnb" / name)
    base = load_base(tmp_path / "bnb", quantize=None)  # as saved: NF4 whatever `quantize` says
    for name, linear in base.model.linears().items():
        param = hf.get_submodule(name).weight
        want = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        assert linear.weight.format == "nf4" and torch.equal(linear.dequantized_weight(), want), name


@pytest.mark.compat
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_save_quantized_loads_in_transformers_and_back(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from adapterhub.runtime.model.tiny import random_checkpoint

    src = random_checkpoint(tmp_path / "src", ModelConfig.from_hf_json(BNB_CONFIG), seed=2, std=0.15)
    base = load_base(src, quantize=fmt)
    path = base.save_quantized(tmp_path / "q")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == fmt
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    again = load_base(path, quantize=None)  # as saved
    for name, linear in base.model.linears().items():
        param = hf.get_submodule(name).weight
        assert isinstance(param, bnb.nn.Params4bit) and param.quant_state.quant_type == fmt, name
        assert torch.equal(bnb.functional.dequantize_4bit(param.data, param.quant_state), linear.dequantized_weight())
        reloaded = again.model.get_submodule(name).weight
        assert reloaded.format == fmt and torch.equal(reloaded.packed, linear.weight.packed), name


def test_generation_config_eos_ids_stop_generation(checkpoint_dir):
    path = checkpoint_dir("llama")
    plain = load_base(path, quantize=None, compute_dtype=torch.float32)
    out = plain.generate(["hi"], max_new_tokens=6)[0]
    assert plain.stop_token_ids() == [257] and out.finish_reason == "length"
    end_of_turn = out.token_ids[3]  # make a token the greedy text reaches an end-of-turn id
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, end_of_turn]}))
    chat = load_base(path, quantize=None, compute_dtype=torch.float32)
    assert chat.config.eos_token_id == (257, end_of_turn)
    stopped = chat.generate(["hi"], max_new_tokens=6)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[: out.token_ids.index(end_of_turn)]


def test_malformed_nf4_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from adapterhub.runtime.model.tiny import random_checkpoint

    base = load_base(random_checkpoint(tmp_path / "src", ModelConfig.from_hf_json(BNB_CONFIG), std=0.15), quantize="nf4")
    path = base.save_quantized(tmp_path / "q")
    tensors = load_file(path / "model.safetensors")
    k = "model.layers.0.self_attn.k_proj.weight"
    q_blob = tensors["model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"].clone()
    wrong = tensors | {k + ".quant_state.bitsandbytes__nf4": q_blob}  # k_proj claims q_proj's shape
    save_file(wrong, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.k_proj does not load"):
        load_base(path)
    fp4 = {(n.replace("bitsandbytes__nf4", "bitsandbytes__fp4") if n.startswith(k) else n): t for n, t in tensors.items()}
    save_file(fp4, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="k_proj does not load: .*is not a fp4 quant state"):
        load_base(path)  # NF4 data relabelled FP4: its JSON still says nf4
    unknown = {n.replace("bitsandbytes__nf4", "bitsandbytes__int4") if n.startswith(k) else n: t
               for n, t in tensors.items()}
    save_file(unknown, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="k_proj is stored as bitsandbytes INT4; this runtime loads NF4, FP4"):
        load_base(path)
