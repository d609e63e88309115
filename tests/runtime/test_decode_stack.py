"""The decode step in one compiled call (model/decode_stack.py, csrc/decode_layer.c) against its twins: the per-op
fused step (`use_decode_kernels(K, whole_step=False)`) and the torch layers (`use_decode_kernels(None)`).

Every row has its own adapter: ranks 8 and 16 in one batch (two rank groups per linear), one DoRA adapter, one row
on the base only; all non-zero. fp32: every step's logits within the fused step's tolerance of both twins, 1 and 5
rows, on a random Llama (GQA, biases, llama3 RoPE scaling), Mistral (head_dim != hidden / heads, one KV head), Qwen2
(q/k/v biases, tied head) and Phi-3 (fused qkv and gate_up, every layer windowed: windows of 4 tokens). bf16: the same greedy tokens as the torch path, dense and NF4 weights; with NF4
the result is bit-identical to the per-op step (the same C kernels in the same order); dense bf16 weights keep the
per-op step (torch's GEMM, whose sum order decides exact ties). A pool change between steps
(install, uninstall, a stack grown) is seen by the next step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.base import Base, load_base
from adapterhub.runtime.kernels import decode, decode_layer
from adapterhub.runtime.model.tiny import byte_tokenizer, random_checkpoint
from family_fixtures import all_targets, hf_checkpoint
from model_fixtures import family_config, fp32_model, greedy_decode

K = decode.kernels()
pytestmark = pytest.mark.skipif(K is None or decode_layer.kernel() is None,
                                reason="no compiled CPU kernels here (the model keeps the torch path)")
STEPS = 24
FP32_ATOL = 1e-4  # as tests/runtime/test_decode_fused.py
PROMPT_LENGTHS = (3, 9, 1, 14, 6)


class CountingKernel:
    """The whole-step kernel, counting its calls: the one-call path must be the one that ran."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def run(self, stack, step):
        self.calls += 1
        return self.kernel.run(stack, step)


def _use(base: Base, path: str) -> CountingKernel | None:
    """Puts the model on one path: "stack" (one call per step), "per-op" or "torch"."""
    base.model.use_decode_kernels(None if path == "torch" else K, whole_step=path == "stack")
    if path != "stack":
        return None
    counter = CountingKernel(base.model.decode_stack.kernel)
    base.model.decode_stack.kernel = counter
    return counter


def _adapters(base: Base, family: str) -> list[str]:
    """r=8, r=16, r=16 DoRA, r=8, every linear, non-zero B."""
    shapes, targets = base.module_shapes(), all_targets(family)
    specs = [(8, False), (16, False), (16, True), (8, False)]
    return [base.add_adapter(random_adapter(shapes, r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora,
                                            seed=20 + i), f"a{i}") for i, (r, dora) in enumerate(specs)]


def _decode(base: Base, ids, rows: int, forced: torch.Tensor | None = None, steps: int = STEPS):
    """Greedy logits (steps, B, V) and tokens (B, steps) of `rows` prompts on a paged cache of 4-token blocks."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS[:rows]]
    return greedy_decode(base, ids, prompts, [4, 1, 5, 0, 2][:rows], steps, forced)


def _fp32_base(family: str, tmp_path) -> Base:
    if family == "llama":
        model, _ = fp32_model("llama")
        return Base(family_config("llama"), byte_tokenizer(), model, max_adapters=6)
    return load_base(hf_checkpoint(tmp_path / family, family), quantize=None, compute_dtype=torch.float32,
                     max_adapters=6)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_fp32_logits_equal_the_per_op_step_and_the_torch_path(tmp_path, family, rows):
    if family in ("mistral", "qwen2"):  # random checkpoints of the fixtures' configs
        base = load_base(random_checkpoint(tmp_path / family, family_config(family), std=0.15), quantize=None,
                         compute_dtype=torch.float32, max_adapters=6)
    else:
        base = _fp32_base(family, tmp_path)
    names = _adapters(base, family)
    ids = base.pool.acquire([names[0], names[1], None, names[2], names[3]][:rows] if rows > 1 else [names[2]])
    _use(base, "torch")
    want_logits, want_tokens = _decode(base, ids, rows)
    _use(base, "per-op")
    per_op_logits, _ = _decode(base, ids, rows, forced=want_tokens)
    counter = _use(base, "stack")
    got_logits, got_tokens = _decode(base, ids, rows, forced=want_tokens)
    assert counter.calls == STEPS - 1 and base.model.decode_stack.reason is None  # every step in one call
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(got_logits, per_op_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(got_logits.argmax(-1).T, want_tokens)  # the same greedy text, fed or not
    adapterless = _decode(base, None, rows, forced=want_tokens)[0]
    assert (adapterless - got_logits).abs().amax() > 0.1  # the adapters matter to these logits


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_bf16_greedy_tokens_equal_the_torch_path(tmp_path, model, quantize):
    """Free-running greedy decoding of 5 rows with their own adapters, as test_decode_fused's bf16 test; the random
    Llama with an MLP of 128 so that every linear's in_features is a multiple of the 4-bit kernel's block."""
    llama = dataclasses.replace(family_config("llama"), intermediate_size=128)
    source = "tiny" if model == "tiny" else random_checkpoint(tmp_path / "llama", llama, std=0.15)
    base = load_base(source, quantize=quantize, compute_dtype=torch.bfloat16, max_adapters=6)
    family = base.config.family.model_type
    names = _adapters(base, family)
    ids = base.pool.acquire([names[0], names[1], None, names[2], names[3]])
    _use(base, "torch")
    want_logits, want_tokens = _decode(base, ids, 5)
    counter = _use(base, "stack")
    got_logits, got_tokens = _decode(base, ids, 5)
    if quantize is None:  # dense bf16 keeps the per-op step (model/decode_stack.py says why)
        assert counter.calls == 0 and "dense bf16" in base.model.decode_stack.reason
    else:
        assert counter.calls == STEPS - 1
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0.0625)  # two bf16 ulps of a logit in [4, 8)
    if quantize == "nf4":  # the per-op step's C kernels, in its order: bit for bit
        _use(base, "per-op")
        per_op_logits, _ = _decode(base, ids, 5, forced=want_tokens)
        assert torch.equal(got_logits, per_op_logits)


def _one_step(base: Base, ids, path: str) -> torch.Tensor:
    """Logits of the first decode step after a prefill of 3 rows, on `path`."""
    counter = _use(base, path)
    logits = _decode(base, ids, 3, steps=2)[0][1]
    assert counter is None or counter.calls == 1
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pool_change_between_steps_is_seen_by_the_next_step(dtype):
    """Install (a new rank group, then a grown stack), uninstall: each step equals the per-op step on the pool as
    it is then (the descriptors point at the new tensors; stale ones would read freed memory or old adapters)."""
    base = load_base("tiny", quantize="nf4", compute_dtype=dtype, max_adapters=6)
    shapes, targets = base.module_shapes(), all_targets("llama")
    add = lambda r, seed, name, dora=False: base.add_adapter(  # noqa: E731
        random_adapter(shapes, r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora, seed=seed), name)
    tol = dict(rtol=0, atol=FP32_ATOL) if dtype == torch.float32 else dict(rtol=0, atol=0)
    add(8, 1, "a")
    ids = base.pool.acquire(["a", None, "a"])
    before = _one_step(base, ids, "stack")
    torch.testing.assert_close(before, _one_step(base, ids, "per-op"), **tol)
    base.pool.release(ids)
    add(16, 2, "b", dora=True)  # a new rank group in every linear
    add(16, 3, "c")  # the same rank: the group's stacks grow (new tensors)
    ids = base.pool.acquire(["a", "b", "c"])
    changed = _one_step(base, ids, "stack")
    torch.testing.assert_close(changed, _one_step(base, ids, "per-op"), **tol)
    assert (changed[0] - before[0]).abs().amax() == 0  # row 0 keeps adapter "a"
    assert (changed[1:] - before[1:]).abs().amax() > 0.05  # rows 1 and 2 now have their own
    base.pool.release(ids)
    base.remove_adapter("b")
    base.remove_adapter("a")
    ids = base.pool.acquire([None, None, "c"])
    after = _one_step(base, ids, "stack")
    torch.testing.assert_close(after, _one_step(base, ids, "per-op"), **tol)
    assert (after[:2] - changed[:2]).abs().amax() > 0.05
    torch.testing.assert_close(after[2], changed[2], **tol)
    base.pool.release(ids)
    with pytest.warns(UserWarning, match="approximately"):  # NF4 requantized: the merge says how far off
        base.merge("c")  # replace_weight: every linear's base weight is a new tensor
    ids = base.pool.acquire([None, None, None])
    merged = _one_step(base, ids, "stack")
    torch.testing.assert_close(merged, _one_step(base, ids, "per-op"), **tol)
    assert (merged[2] - after[2]).abs().amax() < (merged[:2] - after[:2]).abs().amax()  # row 2 kept "c", merged
    base.pool.release(ids)


def test_setting_a_trainable_adapter_moves_the_generation():
    """Training sets `AdapterLinear.trainable` directly (train/init.py): the descriptors must see it too."""
    base = load_base("tiny", quantize="nf4", compute_dtype=torch.float32)
    layer = next(iter(base.model.linears().values()))
    before = AdapterLinear.generation
    layer.trainable = None
    assert AdapterLinear.generation > before


def test_layers_it_does_not_cover_keep_the_per_op_step(tmp_path):
    """q / k norms (Qwen3): the stack says why and the per-op step runs; so does a batch over the 4-bit kernel's
    rows (then the per-op step dequantizes and runs a GEMM)."""
    base = load_base(hf_checkpoint(tmp_path / "qwen3", "qwen3"), quantize=None, compute_dtype=torch.float32)
    counter = _use(base, "stack")
    _decode(base, None, 2, steps=3)
    assert counter.calls == 0 and "qwen3" in base.model.decode_stack.reason
    tiny = load_base("tiny", quantize="nf4", compute_dtype=torch.float32)
    _use(tiny, "stack")
    stack = tiny.model.decode_stack
    assert stack.supports(None, stack.kernel.max_rows[False]) and not stack.supports(None, stack.kernel.max_rows[False] + 1)
