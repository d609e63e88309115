"""The embedded default base: a small Llama built deterministically in code, with a file-free tokenizer.

`load_base("tiny")` needs no download: the weights come from a fixed seed and the tokenizer is
byte-level (ids 0..255 are the bytes, then <s>, </s>, <pad>). The weights are random, so the text is
gibberish; what matters is that it is the same everywhere and that adapters visibly change it.
`random_checkpoint` writes the same kind of model (any small config) as a Hugging Face directory;
tests everywhere build their base models with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from adapterhub.runtime.model.checkpoint import write_checkpoint
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tokenizer import Tokenizer, bytes_to_unicode

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
TINY_SEED = 7  # picked among a few seeds: its greedy text is varied and printable

# Every in_features a multiple of the NF4 blocksize (64), like real Llama sizes, so NF4 rows hold whole blocks.
TINY_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=259, hidden_size=256, intermediate_size=704,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
    bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
)

# The tiny model's chat format, as a Python function and as the equivalent Jinja for tokenizer_config.json.
# The template owns BOS (the Hugging Face convention): a chat prompt is encoded without adding special tokens.
CHAT_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat(messages, add_generation_prompt: bool = True) -> str:
    text = BOS + "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: token id = byte value; <s> is prepended on encode."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])  # ids 256, 257, 258
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 256)])
    return Tokenizer(tok, bos_token=BOS, eos_token=EOS, chat_template=CHAT_JINJA, render_chat=tiny_chat)


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """fp32 HF-named weights: N(0, std) matrices, norms near 1, small biases; deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    c, D, f = config, config.hidden_size, config.family
    randn = lambda *shape, s=std: torch.randn(*shape, generator=g) * s  # noqa: E731
    one = 0.0 if f.has_offset_norm else 1.0  # a Gemma norm stores w and scales by (1 + w)
    # Embeddings N(0, 1) feed the residual stream; tied, they are also the output head and get its scale.
    embed_std = 1 / math.sqrt(D) if c.tie_word_embeddings else 1.0
    w = {"model.embed_tokens.weight": randn(c.vocab_size, D, s=embed_std), "model.norm.weight": one + randn(D, s=0.1)}
    shapes = projection_shapes(c)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, (out, fan_in) in shapes.items():
            w[p + name + ".weight"] = randn(out, fan_in, s=max(std, 1 / math.sqrt(fan_in)))
            has_bias = name.endswith(("q_proj", "k_proj", "v_proj")) and c.attention_bias or (
                name.endswith("o_proj") and c.has_o_bias) or (name.startswith("mlp") and c.mlp_bias)
            if has_bias:
                w[p + name + ".bias"] = randn(out, s=0.02)
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if f.has_sandwich_norms else []
        for name in norms:
            w[p + name + ".weight"] = one + randn(D, s=0.1)
        for name in ("self_attn.q_norm", "self_attn.k_norm") if f.has_qk_norm else ():
            w[p + name + ".weight"] = one + randn(c.head_dim, s=0.1)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = randn(c.vocab_size, D, s=1 / math.sqrt(D))
    return w


def projection_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(Dout, Din) of each decoder projection of one layer, by its HF path under `model.layers.{i}.`."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    D, F = c.hidden_size, c.intermediate_size
    shapes = {"self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
              "self_attn.qkv_proj": (q + 2 * kv, D), "self_attn.o_proj": (D, q), "mlp.gate_proj": (F, D),
              "mlp.up_proj": (F, D), "mlp.gate_up_proj": (2 * F, D), "mlp.down_proj": (D, F)}
    return {name: shapes[name] for name in c.family.projections}


def tiny_weights() -> dict[str, torch.Tensor]:
    """random_weights plus one cheap nudge toward printable text: embedding dim 0 is a constant 4, which the
    residual stream and the final RMSNorm keep positive, and lm_head's dim 0 is +1 for printable ASCII
    (and newline) and -1 for every other token: printable tokens gain about 8 logits."""
    w = random_weights(TINY_CONFIG, seed=TINY_SEED)
    w["model.embed_tokens.weight"][:, 0] = 4.0
    is_printable = torch.zeros(TINY_CONFIG.vocab_size, dtype=torch.bool)
    is_printable[32:127] = is_printable[10] = True
    w["lm_head.weight"][:, 0] = torch.where(is_printable, 1.0, -1.0)
    return w


def random_checkpoint(path: str | Path, config: ModelConfig = TINY_CONFIG, seed: int = TINY_SEED,
                      max_shard_bytes: int | None = None, dtype=torch.float32, std: float = 0.02) -> Path:
    """Writes a Hugging Face checkpoint dir (config.json, safetensors, tokenizer files) with random weights."""
    is_tiny = (config, seed, std) == (TINY_CONFIG, TINY_SEED, 0.02)
    weights = tiny_weights() if is_tiny else random_weights(config, seed, std)
    return write_checkpoint(path, config, {k: v.to(dtype) for k, v in weights.items()}, byte_tokenizer(),
                            max_shard_bytes=max_shard_bytes)
