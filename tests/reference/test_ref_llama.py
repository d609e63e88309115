"""reference/llama.py against transformers (and PEFT adapters per row), random tiny fp32 models."""

import numpy as np
import pytest

from hf_tiny import TINY, build_hf_model, config_dict, hf_positions, numpy_weights, padded_batch
from reference import llama

pytestmark = pytest.mark.compat


def hf_logits(model, ids, mask):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(hf_positions(mask)),
        )
    return out.logits.double().numpy()


@pytest.mark.parametrize("family", sorted(TINY))
def test_forward_matches_transformers_with_padding(family):
    model = build_hf_model(family)
    ids, mask = padded_batch(128, lengths=[7, 4, 1], T=7)
    ref = llama.forward(config_dict(model), numpy_weights(model), ids, mask)
    hf = hf_logits(model, ids, mask)
    real = mask.astype(bool)
    assert ref.shape == (3, 7, 128)
    assert np.abs(hf[real]).max() > 0.5  # non-trivial logits
    np.testing.assert_allclose(ref[real], hf[real], atol=1e-5, rtol=0)


def test_llama3_rope_scaling_changes_frequencies():
    """The test model's llama3 settings rescale low frequencies and interpolate the middle band."""
    config = config_dict(build_hf_model("llama"))
    plain = dict(config, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    scaled, base = llama.rope_inv_freq(config), llama.rope_inv_freq(plain)
    ratio = scaled / base
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / 8)
    assert ((ratio > 1 / 8) & (ratio < 1)).any()  # the smoothed band is exercised


def _peft_rows(model, peft):
    """The PEFT model's adapters as reference row entries: name -> {module path: (A, B, s, m)}."""
    rows = {}
    for path, mod in model.base_model.model.named_modules():
        if not hasattr(mod, "lora_A"):
            continue
        for name in mod.lora_A:
            m = mod.lora_magnitude_vector[name].weight if name in mod.lora_magnitude_vector else None
            rows.setdefault(name, {})[path] = (
                mod.lora_A[name].weight.detach().numpy(),
                mod.lora_B[name].weight.detach().numpy(),
                mod.scaling[name],
                None if m is None else m.detach().numpy(),
            )
    return rows


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapters_per_row_match_peft_single_runs(family):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = build_hf_model(family)
    config, w = config_dict(base), numpy_weights(base)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    dora = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    rs = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj"], use_rslora=True, init_lora_weights=False)
    model = peft.get_peft_model(base, lora, adapter_name="plain")
    model.add_adapter("dora", dora)
    model.add_adapter("rs", rs)
    with torch.no_grad():  # magnitude starts at ||W + sBA||, i.e. g = 1: perturb it so DoRA differs from LoRA
        for mod in model.modules():
            if hasattr(mod, "lora_magnitude_vector") and "dora" in mod.lora_magnitude_vector:
                v = mod.lora_magnitude_vector["dora"].weight
                v.mul_(1 + 0.3 * torch.rand_like(v))
    model.eval()
    adapters = _peft_rows(model, peft)
    ids, mask = padded_batch(128, lengths=[5, 3, 5, 4], T=5, seed=3)
    names = [None, "plain", "dora", "rs"]
    ref = llama.forward(config, w, ids, mask, adapters=[adapters.get(n) for n in names])
    base_ref = llama.forward(config, w, ids, mask)
    for b, name in enumerate(names):
        real = mask[b].astype(bool)
        if name is None:
            with model.disable_adapter():
                hf = hf_logits(model, ids[b : b + 1], mask[b : b + 1])[0]
        else:
            model.set_adapter(name)
            hf = hf_logits(model, ids[b : b + 1], mask[b : b + 1])[0]
            assert np.abs(ref[b, real] - base_ref[b, real]).max() > 1e-2  # the adapter changes the output
        np.testing.assert_allclose(ref[b, real], hf[real], atol=1e-4, rtol=0)
