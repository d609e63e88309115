"""bench/gguf_export.py writes what llama.cpp expects: read back with gguf's own GGUFReader, every tensor has
llama.cpp's name, type and shape, dequantizes to the HF weights within the 4-bit format's error, and the
reordered q / k rows under llama.cpp's rotary (adjacent pairs) give the attention scores HF's rotary
(half split) gives on the original rows. The rotaries here are written from their definitions (HF's
`rotate_half`, ggml's normal rope), independently of the writer.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bench import gguf_export  # noqa: E402

CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
              max_position_embeddings=256)


def hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A random HF Llama state dict (float32) for `config`, lm_head only when untied."""
    rng = np.random.default_rng(seed)
    D, F, V, Dh = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (H * Dh, D), "self_attn.k_proj": (Hkv * Dh, D), "self_attn.v_proj": (Hkv * Dh, D),
              "self_attn.o_proj": (D, H * Dh), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    w = {"model.embed_tokens.weight": rng.normal(0, 0.02, (V, D)), "model.norm.weight": 1 + rng.normal(0, 0.1, D)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rng.normal(0, 0.02, (V, D))
    for i in range(config["num_hidden_layers"]):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = rng.normal(0, 0.05, shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"model.layers.{i}.{name}.weight"] = 1 + rng.normal(0, 0.1, D)
    return {k: v.astype(np.float32) for k, v in w.items()}


def read(path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    value = reader.fields[key]
    return value.contents() if hasattr(value, "contents") else value.parts[value.data[0]][0]


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (Dout, Din) order."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("tied", [True, False])
def test_names_types_shapes_and_metadata(tmp_path, tied):
    config = dict(CONFIG, tie_word_embeddings=tied)
    weights = hf_weights(config)
    reader, tensors = read(gguf_export.write_gguf(tmp_path / "m.gguf", weights, config, "q4_0"))
    blocks = [f"blk.{i}.{n}.weight" for i in range(2) for n in (*gguf_export.LINEAR_NAMES.values(),
                                                                 *gguf_export.NORM_NAMES.values())]
    expected = {"token_embd.weight", "output_norm.weight", *blocks} | (set() if tied else {"output.weight"})
    assert set(tensors) == expected
    Q = gguf.GGMLQuantizationType
    assert tensors["token_embd.weight"].tensor_type == Q.F16
    assert tensors["token_embd.weight"].shape.tolist() == [64, 320]  # ne: innermost (D) first
    assert tensors["blk.1.attn_k.weight"].tensor_type == Q.Q4_0
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [64, 32]  # (Din, Hkv * Dh)
    assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [96, 64]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 320  # one token per embedding row


def test_rope_base_from_either_config_form(tmp_path):
    """transformers 5 writes rope_theta under "rope_parameters"; a wrong base would show in llama.cpp only as
    logits drifting with the position."""
    config = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    reader, _ = read(gguf_export.write_gguf(tmp_path / "m.gguf", hf_weights(config), config, "q4_1"))
    assert field(reader, "llama.rope.freq_base") == pytest.approx(500000.0)


def test_dense_tensors_are_the_weights(tmp_path):
    weights = hf_weights(CONFIG)
    _, tensors = read(gguf_export.write_gguf(tmp_path / "m.gguf", weights, CONFIG, "f16"))
    np.testing.assert_array_equal(dequantized(tensors["token_embd.weight"]),
                                  weights["model.embed_tokens.weight"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(dequantized(tensors["blk.1.ffn_norm.weight"]),
                                  weights["model.layers.1.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(dequantized(tensors["blk.0.attn_v.weight"]),
                                  weights["model.layers.0.self_attn.v_proj.weight"].astype(np.float16))


def q4_bound(weight: np.ndarray, fmt: str) -> np.ndarray:
    """The largest error per element of round-to-nearest 4-bit blocks of 32 (scales stored in f16):
    Q4_0 (d = signed absmax / -8, codes -8..7): the +absmax end clips by d, so |d| = absmax / 8;
    Q4_1 (d = (max - min) / 15, offset min): d / 2, plus the f16 rounding of min."""
    blocks = weight.reshape(-1, 32)
    if fmt == "q4_0":
        bound = np.abs(blocks).max(1) / 8 * 1.002
    else:
        lo, hi = blocks.min(1), blocks.max(1)
        bound = (hi - lo) / 30 * 1.002 + np.abs(lo) * 2**-10
    return np.repeat(bound + 1e-7, 32).reshape(weight.shape)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_quantized_linears_dequantize_to_the_weights(tmp_path, fmt):
    weights = hf_weights(CONFIG)
    _, tensors = read(gguf_export.write_gguf(tmp_path / "m.gguf", weights, CONFIG, fmt))
    errors = []
    for i in range(2):
        for hf, name in gguf_export.LINEAR_NAMES.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            got = dequantized(tensors[f"blk.{i}.{name}.weight"])
            heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}.get(hf)
            if heads:
                got = gguf_export.split_rotary_rows(got, heads)
            assert (np.abs(got - w) <= q4_bound(w, fmt)).all(), (fmt, hf)
            errors.append(np.abs(got - w).mean() / np.abs(w).mean())
    # 16 levels over a block's range: a mean error of a few percent, never zero (the data was quantized).
    assert 0.02 < np.mean(errors) < 0.15


def hf_rotary(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """HF Llama: x * cos + rotate_half(x) * sin, frequencies repeated over both halves.  # (H, Dh)"""
    Dh = x.shape[-1]
    angle = position * theta ** (-np.arange(0, Dh, 2) / Dh)
    cos, sin = np.cos(np.concatenate([angle, angle])), np.sin(np.concatenate([angle, angle]))
    rotated = np.concatenate([-x[..., Dh // 2:], x[..., : Dh // 2]], axis=-1)
    return x * cos + rotated * sin


def ggml_rotary(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """ggml's normal rope (llama.cpp's llama arch): dims (2j, 2j + 1) rotate by position * theta^(-2j/Dh)."""
    Dh = x.shape[-1]
    angle = position * theta ** (-np.arange(0, Dh, 2) / Dh)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_reordered_rows_give_hf_attention_scores_under_llama_cpp_rotary(tmp_path):
    weights = hf_weights(CONFIG)
    _, tensors = read(gguf_export.write_gguf(tmp_path / "m.gguf", weights, CONFIG, "f16"))
    H, Hkv, Dh, theta = 4, 2, 16, CONFIG["rope_theta"]
    x_q, x_k = np.random.default_rng(1).normal(size=(2, 64))
    wq, wk = (weights[f"model.layers.1.self_attn.{m}_proj.weight"].astype(np.float16).astype(np.float64)
              for m in ("q", "k"))
    gq, gk = (dequantized(tensors[f"blk.1.attn_{m}.weight"]).astype(np.float64) for m in ("q", "k"))
    group = np.arange(H) // (H // Hkv)  # the KV head of each query head
    for m, n in ((7, 3), (40, 0), (100, 99)):
        q_hf = hf_rotary((wq @ x_q).reshape(H, Dh), m, theta)
        k_hf = hf_rotary((wk @ x_k).reshape(Hkv, Dh), n, theta)
        q_cpp = ggml_rotary((gq @ x_q).reshape(H, Dh), m, theta)
        k_cpp = ggml_rotary((gk @ x_k).reshape(Hkv, Dh), n, theta)
        scores_hf = (q_hf * k_hf[group]).sum(-1)
        np.testing.assert_allclose((q_cpp * k_cpp[group]).sum(-1), scores_hf, rtol=1e-9, atol=1e-12)
        # The rows as HF stores them do not give these scores under llama.cpp's rotary (what the reordering fixes).
        unordered = (ggml_rotary((wq @ x_q).reshape(H, Dh), m, theta)
                     * ggml_rotary((wk @ x_k).reshape(Hkv, Dh), n, theta)[group]).sum(-1)
        assert np.abs(unordered - scores_hf).max() > 1e-3 * np.abs(scores_hf).max()


def test_rotary_reordering_round_trips():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    moved = gguf_export.interleave_rotary_rows(w, 4)
    assert moved[1, 0] == w[8, 0]  # head 0: row 1 is the first row of the second half
    np.testing.assert_array_equal(gguf_export.split_rotary_rows(moved, 4), w)
