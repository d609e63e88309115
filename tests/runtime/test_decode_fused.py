"""A decode step on the fused ops (model/model.py's `_decode`, kernels/decode.py) against the same model on its torch
layers (`use_decode_kernels(None)`): 32 greedy tokens from a batch of prompts of different lengths on the paged
cache (blocks of 4 tokens, so every row crosses blocks), each row with its own adapter.

fp32: every step's logits within 1e-4 of the torch path's, the same tokens. bf16: the fused ops round as torch
does, attention with SDPA's own fast exp and blocks (csrc/decode_cpu.c), so what differs is the order of some fp32
sums (RMSNorm's sum of squares, the dot products, the lm_head GEMV): logits within two bf16 ulps of the largest
logit, and the same greedy tokens for every prompt of the set, free-running.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import Base, load_base
from adapterhub.runtime.kernels import decode
from adapterhub.runtime.model.tiny import byte_tokenizer
from family_fixtures import NEW_FAMILIES, all_targets, hf_checkpoint
from model_fixtures import family_config, fp32_model, greedy_decode

K = decode.kernels()
pytestmark = pytest.mark.skipif(K is None, reason="no compiled CPU kernels here (the model keeps the torch path)")
STEPS = 32
FP32_ATOL = 1e-4
BF16_LOGIT_ATOL = 0.0625  # two bf16 ulps of a logit in [4, 8) (measured on these models: at most 0.047)


class CountingKernels:
    """The decode kernels, counting calls: the fused path must be the one that ran."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, 0

    def __getattr__(self, name):
        op = getattr(self.kernels, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)

        return counted


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 1, 14)]


def _decode(base: Base, ids, prompts, forced: torch.Tensor | None = None):
    """Greedy logits (STEPS, B, V) and tokens (B, STEPS) on scattered cache rows."""
    return greedy_decode(base, ids, prompts, [4, 1, 5, 0], STEPS, forced)


def _with_adapters(base: Base):
    """LoRA on every linear for rows 0 and 3 (two adapters), row 2 the base."""
    shapes = base.module_shapes()
    targets = all_targets(base.config.family.model_type)
    for i in range(2):
        base.add_adapter(random_adapter(shapes, r=4, lora_alpha=8, target_modules=targets, seed=10 + i), f"a{i}")
    return base.pool.acquire(["a0", "a1", None, "a1"])


def _both_paths(base: Base, forced_from_torch: bool = False):
    ids = _with_adapters(base)
    prompts = _prompts()
    counting = CountingKernels(base.model.decode_kernels)
    base.model.use_decode_kernels(None)
    want_logits, want_tokens = _decode(base, ids, prompts)
    base.model.use_decode_kernels(counting, whole_step=False)  # the per-op step (test_decode_stack.py: the other)
    got_logits, got_tokens = _decode(base, ids, prompts, want_tokens if forced_from_torch else None)
    assert counting.calls > STEPS * base.config.num_hidden_layers  # every layer of every step ran fused
    return got_logits, got_tokens, want_logits, want_tokens


def _fp32_bases():
    model, _ = fp32_model("llama")  # GQA, attention bias, llama3 RoPE scaling
    yield "llama", Base(family_config("llama"), byte_tokenizer(), model, max_adapters=4)
    yield "tiny", load_base("tiny", quantize=None, compute_dtype=torch.float32, max_adapters=4)


@pytest.mark.parametrize("name", ["llama", "tiny"])
def test_fp32_greedy_decode_equals_the_torch_path(name):
    base = dict(_fp32_bases())[name]
    got_logits, got_tokens, want_logits, want_tokens = _both_paths(base)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(got_tokens, want_tokens)
    assert len(set(want_tokens[0].tolist())) > 3  # a text, not one token repeated


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3"])
def test_fp32_greedy_decode_equals_the_torch_path_per_family(tmp_path, family):
    """q / k norms and a window on layer 2 (Qwen3), sandwich (1 + w) norms, GeGLU and a local RoPE (Gemma 3),
    fused qkv / gate_up and every layer windowed (Phi-3): windows of 4 tokens, so decoding runs past them."""
    base = load_base(hf_checkpoint(tmp_path / family, family), quantize=None, compute_dtype=torch.float32,
                     max_adapters=4)
    assert family in NEW_FAMILIES and base.model.decode_kernels is not None
    got_logits, got_tokens, want_logits, want_tokens = _both_paths(base)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(got_tokens, want_tokens)


def test_gemma2_keeps_the_torch_path(tmp_path):
    """Attention soft-capping has no fused op: such a model never gets the kernels."""
    base = load_base(hf_checkpoint(tmp_path / "gemma2", "gemma2"), quantize=None, compute_dtype=torch.float32)
    assert base.model.decode_kernels is None


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_bf16_greedy_tokens_equal_the_torch_path(checkpoint_dir, model, quantize):
    """The embedded tiny model, and a random Llama checkpoint with GQA, attention bias and llama3 RoPE scaling."""
    source = "tiny" if model == "tiny" else checkpoint_dir("llama")
    base = load_base(source, quantize=quantize, compute_dtype=torch.bfloat16, max_adapters=4)
    got_logits, got_tokens, want_logits, want_tokens = _both_paths(base)
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=BF16_LOGIT_ATOL)
    top2 = want_logits.topk(2, dim=-1).values  # (STEPS, B, 2)
    assert ((top2[..., 0] - top2[..., 1]) <= 0.0625).any()  # near-ties occur: equal tokens are not a matter of course
