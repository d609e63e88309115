"""Qwen3, Gemma 2, Gemma 3 text and Phi-3: checkpoints that transformers built and saved load in adapterhub with
the same logits (fp32, 1e-4) for a padded prompt batch and while decoding through the KV cache past the
sliding window; the features that tell each family from Llama change the logits (so the match means
something); config.json parsing, defaults and refusals (docs/semantics.md §12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapterhub.errors import ModelLoadError
from adapterhub.runtime import generate as gen
from adapterhub.runtime.model import layers
from adapterhub.runtime.model.config import ACTIVATIONS, ARCHITECTURES, ModelConfig
from adapterhub.runtime.model.kv_cache import KVCache
from adapterhub.runtime.model.loader import build_model, load_parts
from adapterhub.runtime.model.tiny import random_weights
from family_fixtures import NEW_FAMILIES, WINDOW, hf_checkpoint

ATOL_HF = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(params=list(NEW_FAMILIES))
def new_family(request) -> str:
    return request.param


def _ids(B, T, seed=0):
    return torch.randint(0, 259, (B, T), generator=torch.Generator().manual_seed(seed))


def _load(tmp_path, family, seed=1):
    transformers = pytest.importorskip("transformers")
    path = hf_checkpoint(tmp_path / "ckpt", family, seed=seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    config, _, model = load_parts(path, None, torch.float32, CPU)
    assert config.model_type == family
    return hf.eval(), model


@pytest.mark.compat
def test_padded_prompt_logits_match_transformers(tmp_path, new_family):
    hf, model = _load(tmp_path, new_family)
    ids = _ids(3, 11, seed=2)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()  # logits at padded positions are unspecified
    assert want[real].abs().max() > 1.0
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=ATOL_HF)


@pytest.mark.compat
def test_qwen3_attention_bias_covers_o_proj_too(tmp_path):
    """Qwen3's attention_bias gives q, k, v and o a bias (Qwen2: q, k, v only, semantics §12.2)."""
    transformers = pytest.importorskip("transformers")
    path = hf_checkpoint(tmp_path / "ckpt", "qwen3", seed=4, attention_bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    config, _, model = load_parts(path, None, torch.float32, CPU)
    assert config.attention_bias and config.has_o_bias and model.model.layers[0].self_attn.o_proj.bias is not None
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(ids).logits, rtol=0, atol=ATOL_HF)


@pytest.mark.compat
def test_gemma3_caps_its_logits_but_not_its_attention_as_transformers_does(tmp_path):
    """transformers 5.25's Gemma 3 applies final_logit_softcapping and ignores attn_logit_softcapping (semantics
    §12.4): with both set, the logits still match, and only the final cap moved them."""
    transformers = pytest.importorskip("transformers")
    path = hf_checkpoint(tmp_path / "ckpt", "gemma3_text", seed=4, attn_logit_softcapping=0.5,
                         final_logit_softcapping=2.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    config, _, model = load_parts(path, None, torch.float32, CPU)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (None, 2.0)
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, hf.eval()(ids).logits, rtol=0, atol=ATOL_HF)
    assert ours.abs().max() < 2.0  # capped


@pytest.mark.compat
def test_cache_decoding_past_the_window_matches_transformers(tmp_path, new_family):
    """Prompts of 6, 2 and 3 tokens prefilled into scattered cache rows, then 8 decode steps: every step's logits
    equal transformers' on the whole sequence, well past the 4-token window."""
    hf, model = _load(tmp_path, new_family, seed=3)
    c = model.config
    cache = KVCache(c.num_hidden_layers, 4, c.num_key_value_heads, 24, c.head_dim, dtype=torch.float32)
    seqs = [row.tolist() for row in _ids(3, 6, seed=4)]
    seqs = [seqs[0], seqs[1][:2], seqs[2][:3]]
    rows = [2, 0, 3]
    feed = _ids(3, 8, seed=5)  # fixed next tokens (argmax could tie between implementations)
    with torch.no_grad():
        logits = gen.prefill(model, cache, rows, seqs, None)
        for step in range(feed.shape[1] + 1):
            for b, s in enumerate(seqs):
                want = hf(torch.tensor([s])).logits[0, -1]
                torch.testing.assert_close(logits[b], want, rtol=0, atol=ATOL_HF, msg=f"row {b}, {len(s)} tokens")
            if step == feed.shape[1]:
                break
            for s, t in zip(seqs, feed[:, step].tolist()):
                s.append(t)
            logits = gen.decode(model, cache, torch.tensor(rows), feed[:, step], None)
    assert min(map(len, seqs)) > 2 * WINDOW


def _config(family: str) -> ModelConfig:
    return ModelConfig.from_hf_json(NEW_FAMILIES[family])  # no "architectures": the model_type names it


# Per family: ModelConfig changes that switch off one of its features (each must move the logits).
FEATURES = {
    "qwen3": {"window": dict(sliding_window=None, sliding_layers=())},
    "gemma2": {"attention soft-cap": dict(attn_logit_softcapping=None),
               "final soft-cap": dict(final_logit_softcapping=None),
               "query_pre_attn_scalar": dict(query_pre_attn_scalar=None),
               "window": dict(sliding_window=None, sliding_layers=())},
    "gemma3_text": {"local rope": dict(local_rope_theta=None), "linear rope scaling": dict(rope_scaling=None),
                    "window": dict(sliding_window=None, sliding_layers=())},
    "phi3": {"window": dict(sliding_window=None, sliding_layers=())},
}


@pytest.mark.parametrize("family, feature", [(f, k) for f, v in FEATURES.items() for k in v])
def test_each_feature_changes_the_logits(family, feature):
    config = _config(family)
    weights = random_weights(config, seed=0, std=0.15)
    ids = _ids(1, 12, seed=6)
    out = {}
    for name, c in (("with", config), ("without", dataclasses.replace(config, **FEATURES[family][feature]))):
        model = build_model(c, weights.__getitem__, weights, quantize=None, dtype=torch.float32, device=CPU)
        with torch.no_grad():
            out[name] = model(ids)
    assert (out["with"] - out["without"]).abs().max() > 1e-2, feature


def test_family_configs_parse_and_round_trip():
    qwen3, gemma2, gemma3, phi3 = (_config(f) for f in ("qwen3", "gemma2", "gemma3_text", "phi3"))
    assert qwen3.head_dim == 24 != qwen3.hidden_size // qwen3.num_attention_heads and qwen3.sliding_layers == (1, 2)
    assert not qwen3.attention_bias and qwen3.family.has_qk_norm
    assert gemma2.sliding_layers == (0, 2) and gemma2.hidden_act == "gelu_pytorch_tanh" and gemma2.tie_word_embeddings
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.attention_scale) == (2.0, 3.0, 24**-0.5)
    assert gemma3.sliding_layers == (0, 2) and (gemma3.rope_theta, gemma3.local_rope_theta) == (10000.0, 10.0)
    assert gemma3.rope_scaling.rope_type == "linear" and gemma3.attn_logit_softcapping is None
    assert phi3.sliding_layers == (0, 1) and phi3.rms_norm_eps == 1e-5 and phi3.head_dim == 16
    assert [p.split(".")[1] for p in phi3.family.projections] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    for config in (qwen3, gemma2, gemma3, phi3):
        assert ModelConfig.from_hf_json(config.to_hf_json()) == config


def test_transformers_class_defaults_fill_keys_config_json_leaves_out():
    """save_pretrained writes only what differs from the config class: the family's defaults are those values."""
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=7, vocab_size=259)
    gemma2 = ModelConfig.from_hf_json({**base, "model_type": "gemma2"})
    assert (gemma2.head_dim, gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (256, 50.0, 30.0)
    assert gemma2.query_pre_attn_scalar == 256 and gemma2.tie_word_embeddings and gemma2.sliding_window == 4096
    assert gemma2.sliding_layers == (0, 2, 4, 6)  # (i + 1) % 2: every second layer global
    gemma3 = ModelConfig.from_hf_json({**base, "model_type": "gemma3_text"})
    assert gemma3.sliding_layers == (0, 1, 2, 3, 4, 6)  # every sixth layer global
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.final_logit_softcapping) == (1e6, 1e4, None)
    assert ModelConfig.from_hf_json({**base, "model_type": "qwen3"}).head_dim == 128
    # transformers 5 nests Gemma 3's RoPE per layer type
    nested = ModelConfig.from_hf_json({**base, "model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert (nested.rope_scaling.factor, nested.rope_theta, nested.local_rope_theta) == (8.0, 1e6, 1e4)


def test_activation_names_match_the_implemented_table():
    assert set(ACTIVATIONS) == set(layers.ACTIVATIONS)


PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 32}


@pytest.mark.parametrize("family, change, message", [
    ("phi3", dict(rope_scaling=PHI3_LONGROPE), "'longrope' is not supported.*Phi-3 configs without rope_scaling"),
    ("phi3", dict(rope_scaling={**PHI3_LONGROPE, "type": "su"}), "'su' is not supported"),
    ("phi3", dict(partial_rotary_factor=0.75), "partial_rotary_factor=0.75 is not supported"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    ("gemma3_text", dict(layer_types=["chunked_attention"] * 3), "layer_types"),
])
def test_unsupported_settings_are_refused_by_name(family, change, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf_json({**NEW_FAMILIES[family], **change})


@pytest.mark.parametrize("d", [dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
                               dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
                               dict(model_type="phi")])
def test_unsupported_architecture_names_the_supported_list(d):
    with pytest.raises(ModelLoadError) as error:
        ModelConfig.from_hf_json({**NEW_FAMILIES["qwen3"], **d})
    assert "is not supported; supported:" in str(error.value)
    for arch, model_type in ARCHITECTURES.items():
        assert arch in str(error.value) and model_type in str(error.value)


# --- where the roundings happen, bit for bit in bf16 --------------------------------------------------------

HF_NORMS = {"qwen3": ("qwen3", "Qwen3RMSNorm"), "gemma2": ("gemma2", "Gemma2RMSNorm"),
            "gemma3_text": ("gemma3", "Gemma3RMSNorm"), "phi3": ("phi3", "Phi3RMSNorm")}


@pytest.mark.compat
@pytest.mark.parametrize("family", list(HF_NORMS))
def test_bf16_norms_round_where_transformers_does(family):
    """Llama-kind norms round before the weight multiply, Gemma's (1 + w) norms once after it: equal bits."""
    pytest.importorskip("transformers")
    package, name = HF_NORMS[family]
    hf_norm = getattr(__import__(f"transformers.models.{package}.modeling_{package}", fromlist=[name]), name)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(torch.bfloat16)
    w = (torch.randn(64, generator=g) * 0.3 + (0.0 if family.startswith("gemma") else 1.0)).to(torch.bfloat16)
    theirs = hf_norm(64, eps=1e-6).to(torch.bfloat16)
    ours = layers.norm(dataclasses.replace(_config(family), rms_norm_eps=1e-6), 64, torch.bfloat16, CPU)
    with torch.no_grad():
        theirs.weight.copy_(w)
        ours.weight.copy_(w)
        assert torch.equal(ours(x), theirs(x))
        if family.startswith("gemma"):  # rounding before the multiply (the Llama order) would differ
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
            assert not torch.equal(ours(x), (1 + w) * h.to(x.dtype))


@pytest.mark.compat
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_bf16_embedding_scale_is_rounded_to_bf16_first(family):
    """sqrt(D) is rounded to the model dtype before the multiply: for D = 72, bf16(8.485) = 8.5."""
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(_config(family), hidden_size=72)
    weights = {k: v.to(torch.bfloat16) for k, v in random_weights(config, seed=1, std=0.15).items()}
    model = build_model(config, weights.__getitem__, weights, quantize=None, dtype=torch.bfloat16, device=CPU)
    package = {"gemma2": transformers.models.gemma2.modeling_gemma2, "gemma3_text": transformers.models.gemma3.modeling_gemma3}
    embedding = {"gemma2": "Gemma2TextScaledWordEmbedding", "gemma3_text": "Gemma3TextScaledWordEmbedding"}[family]
    module = getattr(package[family], embedding)(259, 72, 258, 72**0.5)
    assert module.embed_scale.dtype == torch.float32  # the scale as transformers holds it
    ids = _ids(2, 6, seed=8)
    with torch.no_grad():
        module.weight.data = weights["model.embed_tokens.weight"]
        theirs = module(ids)
        assert torch.equal(model._embed(ids), theirs)
        assert not torch.equal(theirs, (weights["model.embed_tokens.weight"][ids].float() * 72**0.5).to(torch.bfloat16))


@pytest.mark.compat
def test_gemma2_bf16_logits_equal_transformers_bit_for_bit(tmp_path):
    """Both sides run Gemma 2's eager (soft-capped) attention, so in bf16 every rounding (embedding scale, the
    four norms per layer, the soft-caps) lines up: the logits are equal, not merely close (on this CPU's
    torch kernels; fp32 differs from both by about 0.05)."""
    transformers = pytest.importorskip("transformers")
    path = hf_checkpoint(tmp_path / "ckpt", "gemma2", seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    _, _, model = load_parts(path, None, torch.bfloat16, CPU)
    ids = _ids(2, 12, seed=9)
    with torch.no_grad():
        theirs, ours = hf.eval()(ids).logits, model(ids)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
