"""A tiny Llama saved by transformers + bitsandbytes in 4 bits, for the compatibility tests of every 4-bit format.

Built from a config (nothing is downloaded), cast to bf16, saved dense, loaded with a `BitsAndBytesConfig`
(quantize on load) and saved again in train mode: an eval-mode forward on an AVX512-BF16 CPU would repack
the weights and change the saved statistics first (docs/semantics.md §3.4, §11.8).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_llama_4bit(tmp_path: Path, quant_type: str, double_quant: bool = True, compute_dtype=None,
                    eval_forward: bool = False):
    """(dense bf16 state dict, dir of the 4-bit checkpoint); with eval_forward, also `<quant_type>_after_eval`,
    saved after one eval-mode forward (the pitfall, on purpose)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    options = {} if compute_dtype is None else {"bnb_4bit_compute_dtype": compute_dtype}  # else bnb's default
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                            bnb_4bit_use_double_quant=double_quant, **options)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quant,
                                                          dtype=torch.bfloat16, device_map="cpu")
    model.train()
    model.save_pretrained(tmp_path / quant_type)
    if eval_forward:
        with torch.no_grad():
            model.eval()(torch.randint(0, 128, (1, 8)))
        model.save_pretrained(tmp_path / f"{quant_type}_after_eval")
    return dense.state_dict(), tmp_path / quant_type
