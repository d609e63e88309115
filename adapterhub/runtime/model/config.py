"""`ModelConfig`: the Llama-family hyper-parameters, read once from a Hugging Face `config.json`.

Llama, Mistral and Qwen2 share one architecture (RMSNorm, RoPE, GQA, SwiGLU MLP); they differ in
defaults: Qwen2 always has a q/k/v bias, Llama has one when `attention_bias` is set. RoPE scaling:
the default rotation and Llama 3.1's frequency-dependent "llama3" scaling. Sliding-window attention
(Mistral; Qwen2 with `use_sliding_window`, on its upper layers) limits each query to the last
`sliding_window` keys on the layers listed in `sliding_layers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adapterhub.errors import ModelLoadError

BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit types (runtime/quant/ has a format per type)
# architecture class name -> model_type; the table of what this runtime implements.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE scaling (transformers `_compute_llama3_parameters`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    architecture: str  # "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
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
    attention_bias: bool = False  # q/k/v (and o for Llama) bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers whose attention is windowed
    quantization: QuantConfig | None = field(default=None, compare=False)

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"  # Qwen2's bias is q/k/v only

    @classmethod
    def from_hf_json(cls, d: dict) -> ModelConfig:
        """Validates a `config.json` dict; unsupported architectures or settings raise ModelLoadError."""
        arch = _architecture(d)
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu', as in Llama)")
        try:
            H = int(d["num_attention_heads"])
            D = int(d["hidden_size"])
            Hkv = int(d.get("num_key_value_heads") or H)
            Dh = int(d.get("head_dim") or D // H)
            layers, V, F = int(d["num_hidden_layers"]), int(d["vocab_size"]), int(d["intermediate_size"])
        except KeyError as missing:
            raise ModelLoadError(f"config.json lacks {missing}; is this a Llama-family causal LM config?") from None
        if H % Hkv:
            raise ModelLoadError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
        theta, scaling = _rope(d)
        window, sliding_layers = _sliding(d, ARCHITECTURES[arch], layers)
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch, vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
            num_attention_heads=H, num_key_value_heads=Hkv, head_dim=Dh,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=ARCHITECTURES[arch] == "qwen2" or bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            pad_token_id=d.get("pad_token_id"), sliding_window=window, sliding_layers=sliding_layers,
            quantization=_quantization(d.get("quantization_config")),
        )

    def to_hf_json(self, dtype="float32") -> dict:
        """The config.json transformers reads back (legacy `rope_theta` / `rope_scaling` keys)."""
        d = {
            "architectures": [self.architecture], "model_type": self.model_type, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id, "dtype": str(dtype).removeprefix("torch."),
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.model_type == "qwen2":
                d["use_sliding_window"] = True
                d["layer_types"] = ["sliding_attention" if i in self.sliding_layers else "full_attention"
                                    for i in range(self.num_hidden_layers)]
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **vars(self.rope_scaling)}
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
        "(Llama-family decoders)"
    )


def _rope(d: dict) -> tuple[float, RopeScaling | None]:
    """transformers 5 nests theta in `rope_parameters`; older configs use `rope_theta` + `rope_scaling`."""
    p = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(p.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ModelLoadError(f"rope scaling type {kind!r} is not supported; supported: 'default', 'llama3'")
    try:
        scaling = RopeScaling(float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"]),
                              int(p["original_max_position_embeddings"]))
    except KeyError as missing:
        raise ModelLoadError(f"llama3 rope scaling lacks {missing} in config.json") from None
    if not math.isfinite(scaling.factor) or scaling.high_freq_factor == scaling.low_freq_factor:
        raise ModelLoadError(f"invalid llama3 rope scaling {scaling}")
    return theta, scaling


def _sliding(d: dict, model_type: str, layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Mistral windows every layer; Qwen2 (only with use_sliding_window) the layers from max_window_layers
    on, or those `layer_types` names "sliding_attention" (transformers 5 writes the list out)."""
    if model_type == "llama" or (model_type == "qwen2" and not d.get("use_sliding_window")):
        return None, ()
    window = d.get("sliding_window")
    if window is None:
        return None, ()
    if "layer_types" in d and d["layer_types"]:
        sliding = tuple(i for i, kind in enumerate(d["layer_types"]) if kind == "sliding_attention")
    elif model_type == "qwen2":
        sliding = tuple(range(int(d.get("max_window_layers", 28)), layers))
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
