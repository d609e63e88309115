"""The trained adapter is a PEFT adapter: `PeftModel.from_pretrained` loads the directory `train` writes and
gives the logits of adapterhub's base with it; served through `Base.generate` (fp32, greedy) it answers as
PEFT's `generate` does. LoRA on all linears and DoRA, on the tiny model written as a transformers checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from adapterhub.train import train

pytestmark = pytest.mark.compat
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_the_trained_adapter_and_generates_the_same(tmp_path, method):
    path = random_checkpoint(tmp_path / "base")  # the embedded tiny model as a checkpoint dir
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Q{i}:", "completion": f" ok {i % 5}"}) + "\n")
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    train(base, tmp_path / "train.jsonl", method=method, r=8, lr=5e-3, max_steps=15, batch_size=8,
          output_dir=tmp_path / "run", progress_bar=False)
    adapter_dir = tmp_path / "run" / "adapter"
    name = base.add_adapter(adapter_dir, name="trained")

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    ids = torch.tensor([base.tokenizer.encode("Q3:")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    ours = base(ids, adapters=[name])
    assert (ours - base(ids)).abs().max() > 1e-2  # the trained adapter changes the logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        peft_tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                     eos_token_id=base.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    served = base.generate([ids[0].tolist()], adapters=[name], max_new_tokens=8)[0].token_ids
    if peft_tokens[-1] == base.tokenizer.eos_token_id:  # PEFT keeps the stop token; generate drops it
        peft_tokens = peft_tokens[:-1]
    assert served == peft_tokens and served
