"""The NumPy reference on its own (no torch / peft): golden values of docs/semantics.md and internal consistency."""

import numpy as np
import pytest

from reference import llama
from reference import lora as ref

CONFIG = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    vocab_size=50, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)
PROJ = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
MLP = {"gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}
LINEARS = [f"model.layers.{i}.{p}.{n}" for i in range(2) for p, t in (("self_attn", PROJ), ("mlp", MLP)) for n in t]


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(size=(50, 32)), "lm_head.weight": rng.normal(size=(50, 32)) * 0.2,
         "model.norm.weight": 1 + 0.1 * rng.normal(size=32)}
    for i in range(2):
        for part, table in (("self_attn", PROJ), ("mlp", MLP)):
            for n, shape in table.items():
                w[f"model.layers.{i}.{part}.{n}.weight"] = rng.normal(size=shape) * 0.2
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * rng.normal(size=32)
    return {k: v.astype(np.float32) for k, v in w.items()}


def random_adapter(weights, targets, seed, dora=False, r=4, s=2.0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in targets:
        dout, din = weights[name + ".weight"].shape
        A, B = rng.normal(size=(r, din)) * 0.3, rng.normal(size=(dout, r)) * 0.3
        m = ref.dora_weight_norm(weights[name + ".weight"], A, B, s) * rng.uniform(0.5, 1.5, dout) if dora else None
        out[name] = (A.astype(np.float32), B.astype(np.float32), s, None if m is None else m.astype(np.float32))
    return out


def test_scaling_golden_values():
    assert ref.scaling(32, 16, use_rslora=True) == 8.0  # §4.2
    assert ref.scaling(16, 8) == 2.0
    rank_pattern, alpha_pattern = {"layers.0.self_attn.q_proj": 4, "v_proj": 2}, {"q_proj": 32}
    got = [ref.module_scaling(f"model.layers.{i}.self_attn.{p}", 8, 16, rank_pattern, alpha_pattern)
           for i, p in ((0, "q_proj"), (0, "v_proj"), (1, "q_proj"))]
    assert got == [(4, 32, 8.0), (2, 16, 8.0), (8, 32, 4.0)]  # the §4.2 example


def test_target_resolution_rules():
    names = LINEARS + ["lm_head"]
    assert len(ref.resolve_targets(names, "all-linear")) == 14 and "lm_head" not in ref.resolve_targets(names, "all-linear")
    assert ref.resolve_targets(names, None) == [n for n in LINEARS if n.endswith(("q_proj", "v_proj"))]
    assert ref.resolve_targets(names, "q_proj") == []  # a string is a full-match regex
    assert ref.resolve_targets(names, ["self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert ref.resolve_targets(names, ["attn.q_proj", "_proj"]) == []  # suffixes match whole dotted components only
    assert ref.resolve_targets(names, ["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert ref.resolve_targets(names, ["q_proj", "k_proj"], exclude_modules=["k_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_lora_and_dora_merge_round_trip_fp32():
    rng = np.random.default_rng(0)
    W, A, B = rng.normal(size=(12, 20)).astype(np.float32), rng.normal(size=(3, 20)), rng.normal(size=(12, 3))
    m = rng.uniform(1, 3, 12)
    x = rng.normal(size=(4, 20))
    merged = ref.merge_lora(W, A, B, 0.5)
    np.testing.assert_allclose(x @ merged.T.astype(np.float64), ref.lora_forward(x, W, None, A, B, 0.5), atol=1e-5)
    np.testing.assert_allclose(ref.unmerge_lora(merged, A, B, 0.5), W, atol=1e-5)
    merged_d, n = ref.merge_dora(W, A, B, 0.5, m)
    np.testing.assert_allclose(x @ merged_d.T.astype(np.float64), ref.dora_forward(x, W, None, A, B, 0.5, m), atol=1e-5)
    np.testing.assert_allclose(ref.unmerge_dora(merged_d, A, B, 0.5, m, n), W, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_llama_adapter_rows_equal_merged_models(dora):
    """Row b with an adapter == the same prompt through a model whose weights have that adapter merged."""
    w = random_weights()
    adapters = [None, random_adapter(w, LINEARS[::3], 1, dora), random_adapter(w, LINEARS[1::2], 2, dora)]
    ids = np.random.default_rng(3).integers(0, 50, size=(3, 6))
    batched = llama.forward(CONFIG, w, ids, adapters=adapters)
    for b, adapter in enumerate(adapters):
        merged = dict(w)
        for name, (A, B, s, m) in (adapter or {}).items():
            W = w[name + ".weight"]
            merged[name + ".weight"] = ref.merge_dora(W, A, B, s, m)[0] if dora else ref.merge_lora(W, A, B, s)
        alone = llama.forward(CONFIG, merged, ids[b : b + 1])
        np.testing.assert_allclose(batched[b], alone[0], atol=1e-4)
        if adapter:
            assert np.abs(batched[b] - batched[0]).max() > 0.1


def test_llama_left_padding_leaves_real_tokens_unchanged():
    w = random_weights()
    ids = np.random.default_rng(4).integers(0, 50, size=(2, 6))
    mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    padded = llama.forward(CONFIG, w, ids, mask)
    alone = llama.forward(CONFIG, w, ids[1:, 3:])
    np.testing.assert_allclose(padded[1, 3:], alone[0], atol=1e-10)
    assert np.isfinite(padded).all()


def test_llama_gqa_head_grouping():
    """With Hkv = 2 and H = 4, query heads 0-1 read kv head 0: duplicating kv heads into an H = Hkv model agrees."""
    w = random_weights()
    config = dict(CONFIG, num_key_value_heads=4)
    wide = dict(w)
    Dh = 8
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            k = w[f"model.layers.{i}.self_attn.{n}.weight"].reshape(2, Dh, 32)  # (Hkv, Dh, D)
            wide[f"model.layers.{i}.self_attn.{n}.weight"] = np.repeat(k, 2, axis=0).reshape(32, 32)
    ids = np.random.default_rng(5).integers(0, 50, size=(1, 5))
    np.testing.assert_allclose(llama.forward(CONFIG, w, ids), llama.forward(config, wide, ids), atol=1e-10)
