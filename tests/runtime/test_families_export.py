"""Base.export on the new families: a checkpoint transformers built, loaded by adapterhub with an adapter merged
in and exported in fp32, loads back in transformers with adapterhub's unmerged logits (fp32, 1e-4); the written
config.json states every value that matters, so transformers' class defaults never decide."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.config import ModelConfig
from family_fixtures import NEW_FAMILIES, all_targets, hf_checkpoint
from reference import nf4 as ref_nf4

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_fp32_export_of_a_merged_adapter_loads_in_transformers(tmp_path, family, kind):
    transformers = pytest.importorskip("transformers")
    base = load_base(hf_checkpoint(tmp_path / "ckpt", family, seed=5), quantize=None, compute_dtype=torch.float32)
    adapter = random_adapter(base.module_shapes(), r=4, lora_alpha=8, target_modules=all_targets(family),
                             use_dora=kind == "dora", seed=2)
    base.add_adapter(adapter, name=kind)
    ids = torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(4))
    unmerged, plain = base(ids, adapters=[kind, kind]), base(ids)
    assert (unmerged - plain).abs().max() > 1e-2

    base.merge(kind)
    result = base.export(tmp_path / "out", dtype="float32")
    written = json.loads((result.path / "config.json").read_text())
    assert ModelConfig.from_hf_json(written) == base.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == base.config.architecture
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, unmerged, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["phi3", "gemma3_text"])
def test_nf4_export_loads_in_bitsandbytes_and_dequantizes_to_the_reference(tmp_path, family):
    """An NF4 export with a merged LoRA: transformers + bitsandbytes load every decoder linear (Phi-3's fused ones
    included) as a 4-bit weight that dequantizes to reference/nf4.py's quantization of the merged bf16 weight;
    the norms (Gemma 3's q/k norms too) and embeddings are written dense."""
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")

    overrides = dict(intermediate_size=128, head_dim=32) if family == "gemma3_text" else dict(intermediate_size=128)
    base = load_base(hf_checkpoint(tmp_path / "ckpt", family, seed=6, **overrides), quantize=None,
                     compute_dtype=torch.float32)
    base.add_adapter(random_adapter(base.module_shapes(), r=4, lora_alpha=8, target_modules=all_targets(family),
                                    seed=3), name="lora")
    base.merge("lora")
    dense = load_file(base.export(tmp_path / "dense", dtype="bfloat16").path / "model.safetensors")
    with pytest.warns(UserWarning, match="only approximately"):  # 4 bits keep a small adapter's delta poorly
        path = base.export(tmp_path / "nf4", dtype="bfloat16", quantize="nf4").path
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")  # no forward (semantics §3.4)
    linears = base.model.linears()
    assert len(linears) == len(base.config.family.projections) * base.config.num_hidden_layers
    for name in linears:
        param = hf.get_submodule(name).weight
        assert isinstance(param, bnb.nn.Params4bit) and param.quant_state.quant_type == "nf4", name
        ref = ref_nf4.quantize(dense[name + ".weight"].float().numpy(), 64, True, "bfloat16",
                               offset=param.quant_state.offset.item())
        want = torch.from_numpy(ref_nf4.dequantize(ref, "bfloat16")).to(torch.bfloat16)
        torch.testing.assert_close(bnb.functional.dequantize_4bit(param.data, param.quant_state), want, rtol=0,
                                   atol=0, msg=name)
    for name, tensor in dense.items():
        if name.removesuffix(".weight") not in linears:
            assert torch.equal(hf.get_parameter(name).data, tensor), name
