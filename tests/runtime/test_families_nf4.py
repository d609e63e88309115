"""NF4 bases of the new families against the NumPy reference: Qwen3 (q/k norms, head_dim != D / H) and Phi-3
(fused qkv_proj / gate_up_proj, quantized as one weight each) against reference/llama.py, Gemma 2 and Gemma 3
text (soft-caps, windows past their 4 tokens, two RoPE bases) against reference/gemma.py. Every decoder
linear holds the reference's NF4 + double-quant codes of the checkpoint weight, and a mixed batch (LoRA,
DoRA, base rows, padding) in fp32 compute equals the reference forward on the dequantized weights with each
row's adapter (1e-5). The Gemma reference itself is checked against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tiny import random_checkpoint, random_weights
from family_fixtures import NEW_FAMILIES, all_targets, attention_targets, hf_model
from reference import gemma as ref_gemma
from reference import llama as ref_llama
from reference import nf4 as ref_nf4

# 64-wide rows (whole NF4 blocks), as real models have. reference/llama.py has no windows: Qwen3 and Phi-3 go
# without; reference/gemma.py has them.
CONFIGS = {"qwen3": {**NEW_FAMILIES["qwen3"], "head_dim": 32, "intermediate_size": 128, "use_sliding_window": False},
           "phi3": {**NEW_FAMILIES["phi3"], "intermediate_size": 128, "sliding_window": None},
           "gemma2": {**NEW_FAMILIES["gemma2"], "intermediate_size": 128},
           "gemma3_text": {**NEW_FAMILIES["gemma3_text"], "intermediate_size": 128}}
REFERENCE = {"qwen3": ref_llama, "phi3": ref_llama, "gemma2": ref_gemma, "gemma3_text": ref_gemma}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_nf4_base_matches_the_reference(tmp_path, family):
    config = ModelConfig.from_hf_json(CONFIGS[family])
    path = random_checkpoint(tmp_path / "base", config, seed=4, std=0.15)
    dense = random_weights(config, seed=4, std=0.15)
    base = load_base(path, quantize="nf4", compute_dtype=torch.float32)
    linears = base.model.linears()
    assert set(linears) == {f"model.layers.{i}.{p}" for i in range(config.num_hidden_layers)
                            for p in config.family.projections}
    for name, layer in linears.items():
        state = {k.removeprefix(name + "."): v.numpy() for k, v in layer.weight.state_dict(name + ".").items()}
        want = ref_nf4.quantize(dense[name + ".weight"].numpy(), 64, True, "float32",
                                offset=ref_nf4.quant_state(state)["nested_offset"])
        np.testing.assert_array_equal(state["weight"], want["weight"], err_msg=name)  # the 4-bit codes
        np.testing.assert_array_equal(layer.dequantized_weight().numpy(), ref_nf4.dequantize(state), err_msg=name)

    weights = {n: p.detach().double().numpy() for n, p in base.model.named_parameters()}
    weights.update({m + ".weight": layer.dequantized_weight().double().numpy() for m, layer in linears.items()})
    shapes = base.module_shapes()
    W = {m: layer.dequantized_weight().numpy() for m, layer in linears.items()}
    zoo = {
        "lora": random_adapter(shapes, r=4, lora_alpha=8, target_modules=attention_targets(family), seed=1),
        "dora": random_adapter(shapes, r=6, lora_alpha=12, target_modules=all_targets(family), use_dora=True, seed=3,
                               base_weights=W),
    }
    for name, adapter in zoo.items():
        base.add_adapter(adapter, name=name)
    rows = ["dora", None, "lora", "dora"]
    ids = torch.randint(0, 259, (len(rows), 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, :2] = 0
    ours = base(ids, adapters=rows, attention_mask=mask)
    per_row = [None if n is None else {m: (a.lora_A, a.lora_B, a.scaling, a.magnitude)
                                       for m, a in zoo[n].modules().items()} for n in rows]
    hf_config = json.loads((path / "config.json").read_text())
    want = REFERENCE[family].forward(hf_config, weights, ids.numpy(), mask.numpy(), per_row)
    keep = mask.bool()
    assert (ours[0] - base(ids[:1], attention_mask=mask[:1])[0]).abs().max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours[keep].double().numpy(), want[keep.numpy()], atol=1e-5, rtol=1e-5)


@pytest.mark.compat
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_reference_matches_transformers(family):
    """reference/gemma.py on a transformers model's own weights and config dict: padded rows, 12 tokens past a
    4-token window, within 1e-4 of transformers' fp32 logits."""
    pytest.importorskip("transformers")
    model = hf_model(family, seed=6)
    weights = {k: v.double().numpy() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    got = ref_gemma.forward(model.config.to_dict(), weights, ids.numpy(), mask.numpy())
    keep = mask.bool()
    assert want[keep].abs().max() > 1.0
    np.testing.assert_allclose(got[keep.numpy()], want[keep].double().numpy(), atol=1e-4, rtol=0)
