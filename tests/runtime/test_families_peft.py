"""PEFT adapters on Qwen3, Gemma 2, Gemma 3 text and Phi-3: made with `get_peft_model` on the transformers model
(non-zero lora_B, a trained-looking DoRA magnitude), saved with `save_pretrained`, loaded by adapterhub as PEFT
dirs; one adapterhub batch with a different adapter (and rank) per row equals PEFT running each adapter alone,
fp32 within 1e-4. Phi-3's adapters target its fused `qkv_proj` / `gate_up_proj`."""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from family_fixtures import NEW_FAMILIES, all_targets, attention_targets, hf_checkpoint

pytestmark = pytest.mark.compat

ROWS = ["attn_r4", None, "dora_r6", "all_r8", "attn_r4"]


def _peft_model(hf, family: str):
    """Three adapters on one PEFT model: LoRA r=4 on attention, rsLoRA r=8 and DoRA r=6 on every linear."""
    peft = pytest.importorskip("peft")
    configs = {
        "attn_r4": peft.LoraConfig(r=4, lora_alpha=8, target_modules=attention_targets(family),
                                   init_lora_weights=False),
        "all_r8": peft.LoraConfig(r=8, lora_alpha=16, target_modules=all_targets(family), use_rslora=True,
                                  init_lora_weights=False),
        "dora_r6": peft.LoraConfig(r=6, lora_alpha=12, target_modules=all_targets(family), use_dora=True,
                                   init_lora_weights=False),
    }
    torch.manual_seed(0)  # PEFT draws A and B from the global generator
    model = peft.get_peft_model(hf, configs["attn_r4"], adapter_name="attn_r4")
    for name in ("all_r8", "dora_r6"):
        model.add_adapter(name, configs[name])
    g = torch.Generator().manual_seed(1)
    scaled = 0
    with torch.no_grad():  # PEFT's magnitude is ||W + s B A||_row (DoRA = LoRA); a trained one is not
        for module in model.modules():
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and "dora_r6" in magnitudes:
                m = magnitudes["dora_r6"].weight
                m.mul_(torch.rand(m.shape, generator=g) + 0.5)
                scaled += 1
    assert scaled == len(all_targets(family)) * hf.config.num_hidden_layers
    return model.eval(), list(configs)


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_mixed_batch_rows_match_peft(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    path = hf_checkpoint(tmp_path / "base", family, seed=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model, names = _peft_model(hf, family)
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_B and all(p.abs().max() > 0 for p in lora_B)
    model.save_pretrained(tmp_path / "adapters")

    base = load_base(path, quantize=None, compute_dtype=torch.float32, max_adapters=4)
    for name in names:
        assert base.add_adapter(tmp_path / "adapters" / name, name=name) == name
    fused = {"phi3": "model.layers.0.self_attn.qkv_proj"}.get(family)
    if fused:  # the fused module holds one adapter over its q, k and v rows
        assert base.pool.adapter("attn_r4").modules()[fused].lora_B.shape[0] == base.module_shapes()[fused][0]
    ids = torch.randint(0, 259, (len(ROWS), 9), generator=torch.Generator().manual_seed(3))
    ours, plain = base(ids, adapters=ROWS), base(ids)
    with torch.no_grad():
        for b, name in enumerate(ROWS):
            if name is None:
                with model.disable_adapter():
                    want = model(ids[b : b + 1]).logits[0]
            else:
                assert (ours[b] - plain[b]).abs().max() > 1e-2, f"adapter {name} does not change the logits"
                model.set_adapter(name)
                want = model(ids[b : b + 1]).logits[0]
            torch.testing.assert_close(ours[b], want, rtol=0, atol=1e-4, msg=f"row {b} ({name})")


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_all_linear_selects_what_peft_selects(tmp_path, family):
    """target_modules="all-linear" resolves on each family as PEFT resolves it (Phi-3: its four fused and plain
    projections), and adapterhub's own adapters with it cover every decoder linear of the base."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path = hf_checkpoint(tmp_path / "base", family, seed=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    shapes = load_base(path, quantize=None, compute_dtype=torch.float32).module_shapes()
    assert {n.rsplit(".", 1)[1] for n in theirs} == set(all_targets(family))
    assert set(random_adapter(shapes, r=4, target_modules="all-linear").modules()) == theirs == set(shapes)
