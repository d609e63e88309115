"""`ModelConfig`: the decoder's hyper-parameters, read once from a Hugging Face `config.json`.

Every supported architecture is the Llama decoder with some traits of `model/families.py` switched on
(Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3). Values a family's transformers config class
defaults, and `save_pretrained` therefore may leave out, come from that family's `defaults`.
RoPE: the default rotation, Llama 3.1's "llama3" scaling and "linear" scaling; Gemma 3 rotates its windowed
layers with a second, local base. Sliding-window attention limits each query to the last `sliding_window`
keys on the layers listed in `sliding_layers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adapterhub.errors import ModelLoadError
from adapterhub.runtime.model.families import ARCHITECTURES, FAMILIES, Family

BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit types (runtime/quant/ has a format per type)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # gate activations model/layers.py implements
ROPE_TYPES = ("default", "llama3", "linear")
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
__all__ = ["ARCHITECTURES", "ModelConfig", "QuantConfig", "RopeScaling"]


@dataclass(frozen=True)
class RopeScaling:
    """"llama3": Llama 3.1's frequency-dependent scaling (transformers `_compute_llama3_parameters`);
    "linear": every frequency divided by `factor` (`_compute_linear_scaling_rope_parameters`)."""

    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"

    def to_hf_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes 4-bit as transformers writes it in `quantization_config` (semantics §3.2)."""

    quant_type: str = "nf4"  # one of BNB_QUANT_TYPES
    use_double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"

    def to_hf_json(self) -> dict:
        return {
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": self.quant_storage, "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.use_double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a key of ARCHITECTURES, e.g. "LlamaForCausalLM"
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (and o, unless the family's bias rule is "qkv")
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers whose attention is windowed
    hidden_act: str = "silu"  # one of ACTIVATIONS
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(Dh) (Gemma)
    attn_logit_softcapping: float | None = None  # scores -> c tanh(scores / c) before the mask (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> c tanh(logits / c) (Gemma 2)
    local_rope_theta: float | None = None  # RoPE base of the windowed layers, unscaled (Gemma 3)
    quantization: QuantConfig | None = field(default=None, compare=False)

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias and self.family.bias == "flag"  # Qwen2's bias is q/k/v only

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf_json(cls, d: dict) -> ModelConfig:
        """Validates a `config.json` dict; unsupported architectures or settings raise ModelLoadError."""
        arch = _architecture(d)
        family = FAMILIES[ARCHITECTURES[arch]]
        d = {**family.defaults, **d}
        act = d.get(family.activation_key) or "silu"
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"{family.activation_key} {act!r} is not supported for {arch}; supported: "
                                 f"{', '.join(ACTIVATIONS)}")
        if d.get("use_bidirectional_attention"):
            raise ModelLoadError(f"use_bidirectional_attention=true is not supported ({arch} loads as a causal LM)")
        try:
            H = int(d["num_attention_heads"])
            D = int(d["hidden_size"])
            Hkv = int(d.get("num_key_value_heads") or H)
            Dh = int(d.get("head_dim") or D // H)
            layers, V, F = int(d["num_hidden_layers"]), int(d["vocab_size"]), int(d["intermediate_size"])
        except KeyError as missing:
            raise ModelLoadError(f"config.json lacks {missing}; is this a {arch} config?") from None
        if H % Hkv:
            raise ModelLoadError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
        theta, scaling, local_theta = _rope(d, family)
        window, sliding_layers = _sliding(d, family, layers)
        eos = d.get("eos_token_id")
        optional = lambda key: None if d.get(key) is None else float(d[key])  # noqa: E731
        return cls(
            architecture=arch, vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
            num_attention_heads=H, num_key_value_heads=Hkv, head_dim=Dh,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=family.bias == "qkv" or (family.bias == "flag" and bool(d.get("attention_bias", False))),
            mlp_bias=family.bias == "flag" and bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            pad_token_id=d.get("pad_token_id"), sliding_window=window, sliding_layers=sliding_layers,
            hidden_act=act, query_pre_attn_scalar=optional("query_pre_attn_scalar"),
            attn_logit_softcapping=optional("attn_logit_softcapping") if family.has_attention_softcap else None,
            final_logit_softcapping=optional("final_logit_softcapping"), local_rope_theta=local_theta,
            quantization=_quantization(d.get("quantization_config")),
        )

    def to_hf_json(self, dtype="float32") -> dict:
        """The config.json transformers reads back (legacy `rope_theta` / `rope_scaling` keys); every value
        that matters is written, so the reader's class defaults never decide."""
        f = self.family
        d = {
            "architectures": [self.architecture], "model_type": self.model_type, f.activation_key: self.hidden_act,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id, "dtype": str(dtype).removeprefix("torch."),
        }
        if f.bias == "flag":
            d["attention_bias"] = self.attention_bias
            if self.model_type == "llama":
                d["mlp_bias"] = self.mlp_bias
        if f.activation_key == "hidden_activation":  # Gemma: every scalar its class defaults differently
            scalar = self.query_pre_attn_scalar  # an int field in transformers' (strict) Gemma config classes
            d.update(query_pre_attn_scalar=int(scalar) if scalar is not None and scalar.is_integer() else scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        if self.local_rope_theta is not None:
            d["rope_local_base_freq"] = self.local_rope_theta
        if f.sliding != "none":
            d["sliding_window"] = self.sliding_window
        if f.sliding == "upper":
            d["use_sliding_window"] = self.sliding_window is not None
        if self.sliding_window is not None and f.sliding in ("upper", "pattern"):
            d["layer_types"] = ["sliding_attention" if i in self.sliding_layers else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_hf_json()
        if self.quantization is not None:
            d["quantization_config"] = self.quantization.to_hf_json()
        return d


def _architecture(d: dict) -> str:
    names = d.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    if not names and d.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[d["model_type"]]
    found = ", ".join(names) or f"model_type={d.get('model_type')!r}"
    raise ModelLoadError(
        f"architecture {found} is not supported; supported: {', '.join(ARCHITECTURES)} "
        f"(model_type {', '.join(_MODEL_TYPES)})"
    )


def _rope(d: dict, family: Family) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, local theta). transformers 5 nests theta in `rope_parameters` (per layer type for Gemma 3:
    "full_attention" / "sliding_attention"); older configs use `rope_theta` + `rope_scaling` (+ Gemma 3's
    `rope_local_base_freq`)."""
    p = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    local = None
    if "full_attention" in p:
        p, local = dict(p["full_attention"] or {}), dict(p.get("sliding_attention") or {})
    theta = float(p.get("rope_theta", d.get("rope_theta", 10000.0)))
    factor = p.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if factor is not None and float(factor) != 1.0:
        raise ModelLoadError(f"partial_rotary_factor={factor} is not supported; only RoPE over the whole head_dim")
    local_theta = None
    if family.has_local_rope:
        if local and local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"rope scaling {local['rope_type']!r} on sliding layers is not supported")
        local_theta = float((local or {}).get("rope_theta", d.get("rope_local_base_freq", 10000.0)))
    return theta, _rope_scaling(p), local_theta


def _rope_scaling(p: dict) -> RopeScaling | None:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ModelLoadError(f"rope scaling type {kind!r} is not supported; supported: "
                             f"{', '.join(map(repr, ROPE_TYPES))} (Phi-3's 'longrope' / 'su' is not implemented: "
                             "only Phi-3 configs without rope_scaling load, e.g. the 4k-context models)")
    try:
        if kind == "linear":
            scaling = RopeScaling(float(p["factor"]), rope_type="linear")
        else:
            scaling = RopeScaling(float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"]),
                                  int(p["original_max_position_embeddings"]))
    except KeyError as missing:
        raise ModelLoadError(f"{kind} rope scaling lacks {missing} in config.json") from None
    if not math.isfinite(scaling.factor) or scaling.factor <= 0 or (
            kind == "llama3" and scaling.high_freq_factor == scaling.low_freq_factor):
        raise ModelLoadError(f"invalid {kind} rope scaling {scaling}")
    return scaling


def _sliding(d: dict, family: Family, layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Windowed layers: `layer_types` (transformers 5 writes the list out) wins; otherwise the family's rule."""
    window = d.get("sliding_window")
    if family.sliding == "none" or window is None or (family.sliding == "upper" and not d.get("use_sliding_window")):
        return None, ()
    if d.get("layer_types"):
        kinds = set(d["layer_types"]) - {"sliding_attention", "full_attention"}
        if kinds or len(d["layer_types"]) != layers:
            raise ModelLoadError(f"layer_types {d['layer_types']} is not {layers} of 'sliding_attention' / "
                                 "'full_attention'")
        sliding = tuple(i for i, kind in enumerate(d["layer_types"]) if kind == "sliding_attention")
    elif family.sliding == "upper":
        sliding = tuple(range(int(d.get("max_window_layers", 28)), layers))
    elif family.sliding == "pattern":  # every n-th layer global (transformers' `(i + 1) % pattern` rule)
        n = int(d["sliding_window_pattern"])
        sliding = tuple(i for i in range(layers) if (i + 1) % n)
    else:
        sliding = tuple(range(layers))
    return (int(window), sliding) if sliding else (None, ())


def _quantization(q: dict | None) -> QuantConfig | None:
    """Only bitsandbytes 4-bit is understood; anything else would load as garbage, so refuse it."""
    if not q:
        return None
    method, quant_type = q.get("quant_method"), q.get("bnb_4bit_quant_type", "fp4")  # bnb's default is fp4
    if method != "bitsandbytes" or not q.get("load_in_4bit") or quant_type not in BNB_QUANT_TYPES:
        raise ModelLoadError(
            f"quantization_config (quant_method={method!r}, load_in_4bit={q.get('load_in_4bit')}, "
            f"bnb_4bit_quant_type={quant_type!r}) is not supported; only bitsandbytes 4-bit {BNB_QUANT_TYPES} "
            "checkpoints load as saved. Load the unquantized model with quantize='nf4' instead"
        )
    return QuantConfig(
        quant_type=quant_type,
        use_double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=str(q.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."),
        quant_storage=str(q.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch."),
    )
