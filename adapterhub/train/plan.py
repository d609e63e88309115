"""Memory of a training run, estimated from the model config alone: weights, gradients, optimizer state and
activations, per method (full fine-tuning, LoRA, QLoRA, DoRA, QLoRA + DoRA), with and without gradient
checkpointing.

The counts follow what this package's training keeps alive (train/loop.py on runtime/adapters/trainable.py):
- weights: the frozen base in the compute dtype, decoder linears in NF4 for the q-methods (0.5 byte per
  weight + the double-quantized absmax: 1 byte per 64 weights + 4 bytes per 256 blocks; semantics §2.4);
  embeddings, norms and lm_head stay in the compute dtype; the adapters in float32. (A dense base's
  decoder weights are its mapped checkpoint file; the loader drops the file pages of the tensors it copies
  out of it, so the embeddings and lm_head count once.)
- gradients and AdamW's two moments: float32, for the trainable parameters only (all of them for "full",
  in the compute dtype, as torch keeps them for a bf16 model).
- activations, per decoder layer and token, in the compute dtype unless said: the RMSNorm inputs kept in
  float32 (two per layer), the inputs of every adapted projection (the attention block's and the MLP's),
  q, k, v (k and v also repeated to every query head), the attention probabilities (H x T per token), the
  attention output, the MLP's gate, up, silu(gate) and product; DoRA also keeps the outputs of q_proj,
  k_proj, o_proj and down_proj (its magnitude's gradient needs every adapted projection's output; those of
  v_proj, gate_proj and up_proj are the tensors attention and the MLP keep anyway). With checkpointing only each layer's input is
  kept, plus one layer's activations while it is recomputed. The head runs on one chunk of labelled rows
  at a time (train/loss.py): a chunk's logits (compute dtype), a float32 copy and the gradient (compute
  dtype), and the (tokens, D) gradient of the head's input.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterhub.errors import ConfigError
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.train.loss import chunk_rows

METHODS = ("full", "lora", "qlora", "dora", "qlora-dora")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes + 8-bit absmax + fp32 second-level absmax


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of one run; `total` is the peak estimate."""

    method: str
    weights: int
    trainable_params: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    @property
    def total_checkpointed(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations_checkpointed + self.logits


def _linears(c: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv, D, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q), "gate_proj": (F, D),
            "up_proj": (F, D), "down_proj": (D, F)}


def plan(c: ModelConfig, method: str, *, r: int = 16, batch: int = 4, seq: int = 512,
         dtype: str = "bfloat16") -> MemoryPlan:
    """The memory of training `method` on a model of config `c` (all-linear targets, rank r)."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    b, L, D, V = DTYPE_BYTES[dtype], c.num_hidden_layers, c.hidden_size, c.vocab_size
    F_, N = c.intermediate_size, batch * seq
    linears = _linears(c)
    linear_weights = L * sum(o * i for o, i in linears.values())
    other = V * D * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * D
    is_dora, is_quantized = method.endswith("dora"), method.startswith("qlora")
    if method == "full":
        trainable = linear_weights + other
        weights, grads, optimizer = trainable * b, trainable * b, 2 * trainable * b
    else:
        trainable = L * sum(r * (i + o) + (o if is_dora else 0) for o, i in linears.values())
        per_weight = NF4_BYTES_PER_WEIGHT if is_quantized else b
        weights = int(linear_weights * per_weight) + other * b + trainable * 4
        grads, optimizer = trainable * 4, 2 * trainable * 4
    q, kv, H = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads
    per_token = (2 * 4 * D  # the two RMSNorm inputs in float32
                 + b * 2 * D  # the normed inputs of the attention projections and of the MLP's
                 + b * (q + 2 * kv)  # q, k, v after RoPE
                 + b * 2 * (q - kv)  # k, v repeated to every query head (GQA in the attention's backward)
                 + b * H * seq  # the attention probabilities, (B, H, T, T)
                 + b * 2 * q  # the attention output and o_proj's input
                 + b * 4 * F_)  # gate, up, silu(gate) and the product (down_proj's input)
    if is_dora:
        per_token += b * (q + kv + 2 * D)  # q_proj, k_proj, o_proj and down_proj outputs (see the docstring)
    if method != "full":
        per_token += b * r * len(linears)  # the A x of every adapter (in the activations' dtype)
    activations = L * N * per_token
    # checkpointing: every layer's input, one layer's activations while it is recomputed, and the gradients
    # flowing through it (the layer's output and its norms' float32 inputs)
    activations_checkpointed = L * N * b * D + N * per_token + 2 * N * D * (b + 4)
    # train/loss.py: one chunk of logits at a time (the model-dtype logits, a float32 copy, the model-dtype
    # gradient; the loss alone peaks 2 bytes per logit above these three, measured), and the gradient of every
    # labelled row kept for the backward pass.
    logits = min(N, chunk_rows(V)) * V * (b + 4 + b + 2) + N * D * b
    return MemoryPlan(method, int(weights), int(trainable), int(grads), int(optimizer), int(activations),
                      int(activations_checkpointed), int(logits))


def as_dict(p: MemoryPlan) -> dict:
    return {**vars(p), "total": p.total, "total_checkpointed": p.total_checkpointed}
