"""Base.export on the new families: a checkpoint transformers built, loaded by adapterhub with an adapter merged
in and exported in fp32, loads back in transformers with adapterhub's unmerged logits (fp32, 1e-4); the written
config.json states every value that matters, so transformers' class defaults never decide."""

from __future__ import annotations

import json

import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.config import ModelConfig
from family_fixtures import NEW_FAMILIES, all_targets, hf_checkpoint

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
