"""A Hugging Face Llama's weights as a GGUF file that llama.cpp loads (the `gguf` package's GGUFWriter).

Used by bench/decode.py to run llama.cpp on the very weights adapterhub and transformers run. The layout
is llama.cpp's "llama" architecture:

- names: `token_embd`, `output_norm`, `output` (left out when the embeddings are tied: llama.cpp then
  reads `token_embd` for the head), and per layer `blk.{i}.attn_norm` / `attn_q` / `attn_k` / `attn_v`
  / `attn_output` / `ffn_norm` / `ffn_gate` / `ffn_up` / `ffn_down`;
- shapes: a (Dout, Din) weight is written row-major as it is; GGUF lists dimensions innermost first,
  so llama.cpp sees ne = [Din, Dout], the layout its matmuls take;
- rotary: HF rotates the two halves of each head's Dh dims (`rotate_half`: dim j pairs with j + Dh/2),
  llama.cpp's llama rope rotates adjacent dims (2j, 2j+1). So the rows of q_proj (per query head) and
  k_proj (per KV head) are reordered, half j -> row 2j, half Dh/2 + j -> row 2j + 1
  (`interleave_rotary_rows`); q·k is unchanged, since both sides get the same reordering;
- types: the decoder linears in one of F16 / Q4_0 / Q4_1 (blocks of 32 along Din), the norms in F32 (llama.cpp
  needs them so) and the token embedding / head in F16 (`EMBEDDING_TYPE`: the same 2 bytes a weight as
  adapterhub's bf16 lm_head reads; llama-quantize's default would store the head in Q6_K).

The tokenizer section is a SentencePiece-style ("llama") vocabulary of the model's size: <unk>, <s>,
</s>, the 256 byte tokens, then placeholders. It is valid for llama.cpp, not a real tokenizer: callers
feed token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

import gguf

LINEAR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
LINEAR_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q4_0": gguf.GGMLQuantizationType.Q4_0,
                "q4_1": gguf.GGMLQuantizationType.Q4_1}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
EMBEDDING_TYPE = gguf.GGMLQuantizationType.F16
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unknown, bos, eos


def interleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's adjacent pairs, per head.  # (H * Dh, Din) -> same shape"""
    Dout, Din = weight.shape
    Dh = Dout // n_heads
    halves = weight.reshape(n_heads, 2, Dh // 2, Din)  # (H, 2, Dh/2, Din): [first halves, second halves]
    return np.ascontiguousarray(halves.transpose(0, 2, 1, 3)).reshape(Dout, Din)  # (H, Dh/2, 2, Din)


def split_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `interleave_rotary_rows`: llama.cpp's rows back to HF's order."""
    Dout, Din = weight.shape
    Dh = Dout // n_heads
    pairs = weight.reshape(n_heads, Dh // 2, 2, Din)  # (H, Dh/2, 2, Din)
    return np.ascontiguousarray(pairs.transpose(0, 2, 1, 3)).reshape(Dout, Din)


def gguf_tensors(weights: Mapping[str, np.ndarray], config: Mapping, linear_format: str,
                 interleave_rotary: bool = True) -> dict:
    """{GGUF name: (float32 array in llama.cpp's layout, GGML type)} for an HF Llama state dict
    (`model.layers.{i}.self_attn.q_proj.weight`, ...; float32 arrays) and its config.json values.
    interleave_rotary=False keeps q / k rows in HF's order: a wrong file, the control of a layout check."""
    if linear_format not in LINEAR_TYPES:
        raise ValueError(f"linear format {linear_format!r} is not one of {sorted(LINEAR_TYPES)}")
    F32 = gguf.GGMLQuantizationType.F32
    out = {"token_embd.weight": (weights["model.embed_tokens.weight"], EMBEDDING_TYPE),
           "output_norm.weight": (weights["model.norm.weight"], F32)}
    if not config.get("tie_word_embeddings", False):
        out["output.weight"] = (weights["lm_head.weight"], EMBEDDING_TYPE)
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for hf, name in NORM_NAMES.items():
            out[f"blk.{i}.{name}.weight"] = (weights[f"{prefix}{hf}.weight"], F32)
        for hf, name in LINEAR_NAMES.items():
            weight = weights[f"{prefix}{hf}.weight"]
            if hf in heads and interleave_rotary:
                weight = interleave_rotary_rows(weight, heads[hf])
            out[f"blk.{i}.{name}.weight"] = (weight, LINEAR_TYPES[linear_format])
    return out


def encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The bytes llama.cpp reads for `array` stored as `qtype` (F32 / F16 as such, quantized as uint8 blocks)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def add_vocabulary(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A valid SentencePiece-style vocabulary of `vocab_size` tokens (see the module docstring)."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    fillers = [f"\u2581t{i}" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(byte_tokens))]
    tokens = [*SPECIAL_TOKENS, *byte_tokens, *fillers]
    if len(tokens) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(SPECIAL_TOKENS) + 256} fixed tokens")
    T = gguf.TokenType
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(SPECIAL_TOKENS) + [0.0] * 256 + [-float(i) for i in range(len(fillers))])
    writer.add_token_types([T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * len(fillers))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def rope_theta(config: Mapping) -> float:
    """The rotary base: transformers 5 writes it under "rope_parameters", earlier versions at the top level."""
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0))


def write_gguf(path: str | Path, weights: Mapping[str, np.ndarray], config: Mapping, linear_format: str,
               context_length: int = 4096, interleave_rotary: bool = True) -> Path:
    """Writes `weights` (an HF Llama state dict of float32 arrays) with `config` (config.json's values) as
    a llama.cpp GGUF with the decoder linears in `linear_format` ("f16", "q4_0", "q4_1"); returns the path."""
    path = Path(path)
    c = config
    Dh = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(min(int(c.get("max_position_embeddings", context_length)), context_length))
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
    writer.add_key_length(Dh)
    writer.add_value_length(Dh)
    writer.add_rope_dimension_count(Dh)
    writer.add_rope_freq_base(rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(FILE_TYPES[linear_format])
    add_vocabulary(writer, c["vocab_size"])
    for name, (array, qtype) in gguf_tensors(weights, config, linear_format, interleave_rotary).items():
        writer.add_tensor(name, encode(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
