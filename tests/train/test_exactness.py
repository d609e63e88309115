"""Training matches PEFT + transformers in fp32: loss and every adapter gradient from the same adapter and
batch, then the loss curve of 20 AdamW steps with warm-up, linear decay and clipping.

LoRA, rsLoRA and DoRA on a tiny Llama (GQA) and Qwen2 (qkv bias, tied embeddings), on a dense and an NF4
base. For NF4 the twin is PEFT on a dense transformers model holding the same dequantized weights (PEFT's
own 4-bit path on a CPU is not a golden value for DoRA, semantics §5.6). The initial adapters have
non-zero lora_B (random_adapter), so every gradient path is exercised.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from adapterhub.train import train
from adapterhub.train.checkpoint import Progress
from adapterhub.train.config import TrainConfig
from adapterhub.train.data import collate
from adapterhub.train.init import attach, detach
from adapterhub.train.loop import next_batch
from adapterhub.train.loss import causal_lm_loss
from train_fixtures import CONFIGS, VARIANTS, random_dataset

pytestmark = pytest.mark.compat
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _setup(tmp_path, family: str, variant: str, quantize: str | None):
    """(our base, PEFT model on dense weights equal to our (dequantized) ones, the initial adapter)."""
    config = CONFIGS[family]
    path = random_checkpoint(tmp_path / "base", config, seed=5, std=0.1)
    base = load_base(path, quantize=quantize, compute_dtype=torch.float32)
    weights = {m: layer.dequantized_weight().clone() for m, layer in base.model.linears().items()}
    use_dora, use_rslora = VARIANTS[variant]
    adapter = random_adapter(base.module_shapes(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora,
                             use_rslora=use_rslora, seed=3, base_weights={m: w.numpy() for m, w in weights.items()})
    adapter.save_peft_dir(tmp_path / "initial")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for module, W in weights.items():
            hf.get_submodule(module).weight.copy_(W)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "initial", is_trainable=True)
    model.train()
    return base, model, adapter


def _peft_grads(model) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module, _, part = name.removeprefix("base_model.model.").partition(".lora_")
            out[(module, "lora_" + part.split(".")[0])] = p.grad
    return out


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_loss_and_every_gradient_match_peft(tmp_path, family, variant, quantize):
    base, model, adapter = _setup(tmp_path, family, variant, quantize)
    batch = collate(list(random_dataset(CONFIGS[family].vocab_size).examples[:4]), pad_id=0)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    expected.loss.backward()
    theirs = _peft_grads(model)

    linears = base.model.linears()
    trainables = attach(linears, adapter.config, 0.0, 0, initial=adapter)
    try:
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        # 5 rows per head chunk: the loss and gradients of 5 chunks (the last one short) against PEFT's
        # loss on the whole (B, T, V) logits
        assert tokens > 20 and tokens % 5
        loss = causal_lm_loss(base.model, batch, 1.0 / tokens, chunk=5)
        loss.backward()
    finally:
        detach(linears)
    ours_loss, their_loss = float(loss.detach()), float(expected.loss.detach())
    assert abs(ours_loss - their_loss) <= 1e-5 * abs(their_loss), f"loss: ours {ours_loss!r} vs PEFT {their_loss!r}"
    ours = {}
    for module, t in trainables.items():
        ours[(module, "lora_A")], ours[(module, "lora_B")] = t.lora_A.grad, t.lora_B.grad
        if t.is_dora:
            ours[(module, "lora_magnitude_vector")] = t.lora_magnitude_vector.grad
    assert set(ours) == set(theirs) and len(ours) == 2 * 7 * (3 if variant == "dora" else 2)
    for key, grad in theirs.items():
        assert grad.norm() > 0, f"{key}: PEFT's gradient is zero, the comparison would be vacuous"
        assert _relative(ours[key], grad) <= 1e-5, f"{key}: relative error {_relative(ours[key], grad):.2e}"


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_twenty_adamw_steps_give_peft_loss_curve(tmp_path, family, variant, quantize):
    base, model, adapter = _setup(tmp_path, family, variant, quantize)
    dataset = random_dataset(CONFIGS[family].vocab_size, n=10, seed=1)
    settings = dict(max_steps=20, batch_size=3, lr=3e-3, warmup=3, schedule="linear", weight_decay=0.01,
                    max_grad_norm=0.5, seed=4)
    use_dora, use_rslora = VARIANTS[variant]
    ours = train(base, dataset, initial=adapter, progress_bar=False, target_modules=TARGETS, r=4, lora_alpha=8,
                 use_rslora=use_rslora, method="dora" if use_dora else "lora", **settings)
    # PEFT + transformers' schedule, on the same batches in the same order.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, settings["warmup"], settings["max_steps"])
    cfg, progress, curve = TrainConfig(batch_size=3, seed=4, max_steps=20), Progress(), []
    for _ in range(20):
        batch = collate(next_batch(dataset, cfg, progress), pad_id=0)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        curve.append(float(loss))
    assert curve[-1] < curve[0] * 0.9, f"PEFT's loss barely moved ({curve[0]:.4f} -> {curve[-1]:.4f})"
    for step, (a, b) in enumerate(zip(ours.progress.losses, curve, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: ours {a:.7f} vs PEFT {b:.7f}"
    assert set(ours.modules()) == set(adapter.modules())


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["one-node", "dropout"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, quantize, dropout):
    path = random_checkpoint(tmp_path / "base", CONFIGS["llama"], seed=5, std=0.1)
    base = load_base(path, quantize=quantize, compute_dtype=torch.float32)
    adapter = random_adapter(base.module_shapes(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, seed=3)
    batch = collate(list(random_dataset(CONFIGS["llama"].vocab_size).examples[:4]), pad_id=0)
    linears, grads = base.model.linears(), []
    for use_checkpointing in (False, True):
        base.model.gradient_checkpointing = use_checkpointing
        trainables = attach(linears, adapter.config, dropout, 0, initial=adapter)
        try:
            torch.manual_seed(0)  # the same dropout masks; checkpointing replays them in the recomputation
            causal_lm_loss(base.model, batch).backward()
        finally:
            detach(linears)
            base.model.gradient_checkpointing = False
        grads.append({(name, part): getattr(t, part).grad.clone() for name, t in trainables.items()
                      for part in ("lora_A", "lora_B", "lora_magnitude_vector")})
    for name, grad in grads[0].items():
        assert grad.norm() > 0
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-9)
