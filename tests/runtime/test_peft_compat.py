"""Full-model logits with PEFT adapters: adapterhub's one mixed batch vs transformers + PEFT, one adapter at a time.

fp32, within 1e-4: LoRA, rsLoRA, DoRA, all-linear targets, GQA, Qwen2's qkv bias. PEFT runs each
adapter alone (its mixed batch refuses DoRA, semantics §7); adapterhub runs every row in one forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from adapters_fixtures import ALL_LINEAR, LLAMA, QWEN2

pytestmark = pytest.mark.compat


def _adapters(base, weights):
    shapes = base.module_shapes()
    return {
        "lora": random_adapter(shapes, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1),
        "rslora": random_adapter(shapes, r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True, seed=2),
        "dora": random_adapter(shapes, r=6, lora_alpha=12, target_modules=ALL_LINEAR, use_dora=True, seed=3,
                               base_weights=weights),
    }


@pytest.mark.parametrize("config", [LLAMA, QWEN2], ids=["llama_gqa", "qwen2_qkv_bias"])
def test_mixed_batch_logits_match_transformers_and_peft(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path = random_checkpoint(tmp_path / "base", config, seed=5)
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    weights = {m: layer.dequantized_weight().numpy() for m, layer in base.model.linears().items()}
    adapters = _adapters(base, weights)
    for name, adapter in adapters.items():
        adapter.save_peft_dir(tmp_path / name)
        base.add_adapter(adapter, name=name)
    rows = ["lora", None, "dora", "rslora"]
    input_ids = torch.randint(0, config.vocab_size, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    ours = base(input_ids, adapters=rows)
    plain = base(input_ids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours[1], hf(input_ids[1:2]).logits[0], atol=1e-4, rtol=1e-4)
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "lora", adapter_name="lora")
        for name in ("rslora", "dora"):
            model.load_adapter(tmp_path / name, adapter_name=name)
        model.eval()
        for b, name in enumerate(rows):
            if name is None:
                continue
            assert (ours[b] - plain[b]).abs().max() > 1e-3, f"adapter {name} does not change the logits"
            model.set_adapter(name)
            expected = model(input_ids[b : b + 1]).logits[0]
            torch.testing.assert_close(ours[b], expected, atol=1e-4, rtol=1e-4, msg=f"row {b} ({name})")


@pytest.mark.parametrize("method", ["linear", "cat", "ties"])
def test_combine_matches_peft_add_weighted_adapter(tmp_path, method):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from adapterhub.runtime.adapters.combine import combine

    path = random_checkpoint(tmp_path / "base", LLAMA, seed=5)
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    shapes = base.module_shapes()
    a = random_adapter(shapes, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1)
    b = random_adapter(shapes, r=4, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=2)
    a.save_peft_dir(tmp_path / "a")
    b.save_peft_dir(tmp_path / "b")
    ours = combine([a, b], [0.6, 0.3], method=method, density=0.5 if method == "ties" else None)
    assert ours.modules()["model.layers.0.self_attn.q_proj"].scaling == 1.0

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    kwargs = {"density": 0.5} if method == "ties" else {}
    model.add_weighted_adapter(["a", "b"], [0.6, 0.3], "mix", combination_type=method, **kwargs)
    for module, m in ours.modules().items():
        layer = model.base_model.model.get_submodule(module)
        assert layer.scaling["mix"] == m.scaling
        np.testing.assert_allclose(layer.lora_A["mix"].weight.detach().numpy(), m.lora_A, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(layer.lora_B["mix"].weight.detach().numpy(), m.lora_B, atol=1e-6, rtol=1e-5)
