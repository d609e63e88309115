"""The architectures this runtime implements: one row of traits per Hugging Face `model_type`.

Every supported model is the Llama decoder (RMSNorm, RoPE, GQA, gated MLP) with some of the traits below
switched on; `model/layers.py` reads them, nothing else branches on the model type. What each trait
means numerically, and the transformers file it was read from, is in docs/semantics.md §12.

`defaults` are the transformers 5 config class defaults that change the numbers, for config.json files that
leave the key out (older or hand-written ones; transformers then uses its class default, not Llama's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# HF module paths of the decoder linears under `model.layers.{i}.` (what PEFT targets and the loader swaps).
SEPARATE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")  # Phi-3


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the `architectures[0]` transformers writes
    projections: tuple[str, ...] = SEPARATE
    bias: str = "flag"  # "flag": attention_bias -> q/k/v/o, mlp_bias -> MLP; "qkv": q/k/v always (Qwen2); "none"
    has_qk_norm: bool = False  # RMSNorm over Dh of every query / key head, before RoPE (Qwen3, Gemma 3)
    has_sandwich_norms: bool = False  # norms on the attention / MLP outputs, and before the MLP (Gemma 2 / 3)
    has_offset_norm: bool = False  # norm weight applied as (1 + w) in fp32, rounded once after (Gemma)
    scales_embeddings: bool = False  # embeddings times sqrt(D) rounded to the model dtype (Gemma)
    sliding: str = "none"  # "none"; "all" (every layer); "upper" (use_sliding_window: layers >= max_window_layers);
    # "pattern" (every `sliding_window_pattern`-th layer is global, the others windowed); layer_types wins
    activation_key: str = "hidden_act"  # Gemma reads `hidden_activation` and ignores `hidden_act`
    has_local_rope: bool = False  # windowed layers rotate with `rope_local_base_freq`, unscaled (Gemma 3)
    has_attention_softcap: bool = False  # applies `attn_logit_softcapping` (Gemma 2; Gemma 3's attention ignores it)
    defaults: dict = field(default_factory=dict)


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM"),
    Family("mistral", "MistralForCausalLM", sliding="all"),
    Family("qwen2", "Qwen2ForCausalLM", bias="qkv", sliding="upper"),
    Family("qwen3", "Qwen3ForCausalLM", has_qk_norm=True, sliding="upper",
           defaults={"head_dim": 128, "max_window_layers": 28}),
    Family("gemma2", "Gemma2ForCausalLM", has_sandwich_norms=True, has_offset_norm=True, scales_embeddings=True,
           sliding="pattern", activation_key="hidden_activation", has_attention_softcap=True,
           defaults={"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                     "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 2,
                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    Family("gemma3_text", "Gemma3ForCausalLM", has_qk_norm=True, has_sandwich_norms=True, has_offset_norm=True,
           scales_embeddings=True, sliding="pattern", activation_key="hidden_activation", has_local_rope=True,
           defaults={"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                     "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
                     "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}),
    Family("phi3", "Phi3ForCausalLM", projections=FUSED, bias="none", sliding="all", defaults={"rms_norm_eps": 1e-5}),
)}
# architecture class name -> model_type; the table of what this runtime implements.
ARCHITECTURES = {f.architecture: f.model_type for f in FAMILIES.values()}
