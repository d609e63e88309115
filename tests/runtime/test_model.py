"""The Transformer against the NumPy reference (reference/llama.py) and transformers; the KV cache against
full recomputation. fp32 throughout; tolerances from the issue: 1e-5 vs the reference, 1e-4 vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime import generate as gen
from adapterhub.runtime.base import Base
from adapterhub.runtime.model.kv_cache import KVCache
from adapterhub.runtime.model.tiny import byte_tokenizer
from model_fixtures import FAMILIES, family_config, fp32_model
from reference import llama as ref

ATOL_REF, ATOL_HF = 1e-5, 1e-4


def _ids(V, B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _masks(B, T):
    """Row 0 full, row 1 left-padded by 3, row 2 right-padded by 4."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, T - 4:] = 0
    return mask


def _numpy(weights):
    return {k: v.numpy() for k, v in weights.items()}


def test_logits_match_reference_with_padding(family):
    model, weights = fp32_model(family)
    ids, mask = _ids(259, 3, 11), _masks(3, 11)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).numpy()
    want = ref.forward(FAMILIES[family], _numpy(weights), ids.numpy(), mask.numpy())
    real = mask.numpy().astype(bool)  # logits at padded positions are unspecified
    assert np.abs(want).max() > 1.0  # a non-trivial model
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=ATOL_REF)


def test_padding_does_not_change_real_tokens(family):
    """A left-padded row equals the same tokens unpadded (positions follow the mask)."""
    model, _ = fp32_model(family)
    ids = _ids(259, 1, 8, seed=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, with_pad = model(ids), model(padded, attention_mask=mask)[:, 3:]
    torch.testing.assert_close(with_pad, alone, rtol=0, atol=ATOL_REF)


def test_rope_scaling_and_bias_matter():
    """The features the families exercise change the output (the tests above could not pass vacuously)."""
    model, weights = fp32_model("llama")
    d = dict(FAMILIES["llama"], rope_scaling=None)
    ids = _ids(259, 1, 40)
    with torch.no_grad():
        got = model(ids).numpy()
    unscaled = ref.forward(d, _numpy(weights), ids.numpy())
    assert np.abs(got - unscaled).max() > 1e-3
    no_bias = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    assert np.abs(got - ref.forward(dict(d, attention_bias=False), _numpy(no_bias), ids.numpy())).max() > 1e-3


def _cache(model, max_batch, max_seq):
    c = model.config
    return KVCache(c.num_hidden_layers, max_batch, c.num_key_value_heads, max_seq, c.head_dim, dtype=torch.float32)


def _last_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1]


def test_cache_decoding_equals_full_recomputation(family):
    """Prompts of different lengths prefilled together into scattered rows, then decoded: every step's logits
    equal running the whole sequence without a cache; rows leave and a new row reuses a freed cache row."""
    model, _ = fp32_model(family)
    cache = _cache(model, max_batch=5, max_seq=32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 259, (n,), generator=g).tolist() for n in (5, 2, 9)]
    rows = [3, 0, 4]
    with torch.no_grad():
        logits = gen.prefill(model, cache, rows, prompts, None)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b], _last_logits(model, p), rtol=0, atol=ATOL_REF)
        seqs = [list(p) for p in prompts]
        for step in range(4):
            tokens = logits.argmax(-1)
            for s, t in zip(seqs, tokens.tolist()):
                s.append(t)
            logits = gen.decode(model, cache, torch.tensor(rows), tokens, None)
            for b, s in enumerate(seqs):
                torch.testing.assert_close(logits[b], _last_logits(model, s), rtol=0, atol=ATOL_REF)
        # Row 3 leaves; a new, shorter prompt takes it over while the others keep decoding.
        cache.free([3])
        fresh = [7, 8, 9]
        new_logits = gen.prefill(model, cache, [3], [fresh], None)
        torch.testing.assert_close(new_logits[0], _last_logits(model, fresh), rtol=0, atol=ATOL_REF)
        tokens = torch.cat([new_logits.argmax(-1), logits[1:].argmax(-1)])
        seqs = [fresh + [int(tokens[0])], seqs[1] + [int(tokens[1])], seqs[2] + [int(tokens[2])]]
        logits = gen.decode(model, cache, torch.tensor([3, 0, 4]), tokens, None)
        for b, s in enumerate(seqs):
            torch.testing.assert_close(logits[b], _last_logits(model, s), rtol=0, atol=ATOL_REF)
    assert cache.lengths.tolist() == [len(seqs[1]), 0, 0, len(seqs[0]), len(seqs[2])]


def test_mixed_adapters_match_reference():
    """Full model, one batch, a different adapter per row (LoRA, DoRA all-linear, none) vs reference.forward."""
    model, weights = fp32_model("qwen2")
    base = Base(family_config("qwen2"), byte_tokenizer(), model, max_adapters=4)
    shapes = base.module_shapes()
    dense = {n: w.numpy() for n, w in weights.items() if n.removesuffix(".weight") in shapes}
    lora = random_adapter(shapes, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1)
    dora = random_adapter(shapes, r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                          use_dora=True, seed=2,
                          base_weights={n.removesuffix(".weight"): w for n, w in dense.items()})
    base.add_adapter(lora, "lora")
    base.add_adapter(dora, "dora")
    ids, mask = _ids(259, 3, 7, seed=5), _masks(3, 7)
    names = ["lora", None, "dora"]
    got = base(ids, adapters=names, attention_mask=mask).numpy()
    plain = base(ids, attention_mask=mask).numpy()
    real = mask.numpy().astype(bool)
    assert np.abs(got - plain)[[0, 2]].max() > 1e-2  # the adapters change the output
    rows = [None if n is None else _reference_adapter(a) for n, a in zip(names, (lora, None, dora))]
    want = ref.forward(FAMILIES["qwen2"], _numpy(weights), ids.numpy(), mask.numpy(), adapters=rows)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=ATOL_REF)


def _reference_adapter(adapter):
    return {name: (m.lora_A, m.lora_B, m.scaling, m.magnitude) for name, m in adapter.modules().items()}


# --- compat: transformers -------------------------------------------------------------------------------


@pytest.mark.compat
def test_logits_match_transformers(family, checkpoint_dir):
    transformers = pytest.importorskip("transformers")
    from adapterhub.runtime.model.loader import load_parts

    path = checkpoint_dir(family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    _, _, model = load_parts(path, None, torch.float32, torch.device("cpu"))
    ids, mask = _ids(259, 3, 11, seed=2), _masks(3, 11)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=ATOL_HF)


SLIDING = {
    "mistral": {**FAMILIES["mistral"], "sliding_window": 4},
    "qwen2": {**FAMILIES["qwen2"], "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_attention_with_cache(family):
    from adapterhub.runtime.model.config import ModelConfig
    from adapterhub.runtime.model.loader import build_model
    from adapterhub.runtime.model.tiny import random_weights

    config = ModelConfig.from_hf_json(SLIDING[family])
    assert config.sliding_window == 4 and config.sliding_layers == {"mistral": (0, 1), "qwen2": (1,)}[family]
    assert ModelConfig.from_hf_json(config.to_hf_json()) == config
    weights = random_weights(config, seed=0, std=0.15)
    model = build_model(config, weights.__getitem__, weights, quantize=None, dtype=torch.float32, device="cpu")
    seq = _ids(259, 1, 14, seed=4)[0].tolist()
    with torch.no_grad():
        windowed = model(torch.tensor([seq]))
    unwindowed = ref.forward(FAMILIES[family], _numpy(weights), np.array([seq]))
    assert np.abs(windowed.numpy() - unwindowed)[:, 4:].max() > 1e-3  # the window changes later positions
    np.testing.assert_allclose(windowed.numpy()[:, :4], unwindowed[:, :4], rtol=0, atol=ATOL_REF)  # not earlier
    cache = _cache(model, max_batch=2, max_seq=16)
    with torch.no_grad():
        logits = gen.prefill(model, cache, [1], [seq[:5]], None)
        for n in range(5, len(seq)):
            torch.testing.assert_close(logits[0], windowed[0, n - 1], rtol=0, atol=ATOL_REF)
            logits = gen.decode(model, cache, torch.tensor([1]), torch.tensor([seq[n]]), None)


@pytest.mark.compat
@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_matches_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from adapterhub.runtime.model.config import ModelConfig
    from adapterhub.runtime.model.loader import load_parts
    from adapterhub.runtime.model.tiny import random_checkpoint

    path = random_checkpoint(tmp_path, ModelConfig.from_hf_json(SLIDING[family]), seed=1, std=0.15)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    _, _, model = load_parts(path, None, torch.float32, torch.device("cpu"))
    ids = _ids(259, 2, 14, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=ATOL_HF)


def test_nf4_model_equals_reference_on_its_dequantized_weights(tmp_path):
    """An NF4 base (fp32 compute) is the reference model evaluated at the dequantized weights."""
    from adapterhub.runtime import load_base
    from adapterhub.runtime.model.config import ModelConfig
    from adapterhub.runtime.model.tiny import random_checkpoint, random_weights

    d = {**FAMILIES["llama"], "intermediate_size": 128}  # whole NF4 blocks per row, as real sizes
    config = ModelConfig.from_hf_json(d)
    base = load_base(random_checkpoint(tmp_path, config, seed=3, std=0.15), quantize="nf4", compute_dtype=torch.float32)
    weights = {k: v.numpy() for k, v in random_weights(config, seed=3, std=0.15).items()}
    dequantized = dict(weights)
    for name, linear in base.model.linears().items():
        assert linear.weight.format == "nf4"
        dequantized[name + ".weight"] = linear.dequantized_weight().numpy()
    ids, mask = _ids(259, 3, 9, seed=8), _masks(3, 9)
    got = base(ids, attention_mask=mask).numpy()
    real = mask.numpy().astype(bool)
    assert np.abs(got - ref.forward(d, weights, ids.numpy(), mask.numpy()))[real].max() > 1e-3  # NF4 is lossy
    np.testing.assert_allclose(got[real], ref.forward(d, dequantized, ids.numpy(), mask.numpy())[real], rtol=0, atol=ATOL_REF)


def test_forward_with_cache_rows_appends_after_each_rows_length():
    """forward(tokens, cache=..., rows=...) writes after each row's length (docs/runtime.md); the caller advances it."""
    model, _ = fp32_model("llama")
    cache = _cache(model, max_batch=3, max_seq=16)
    prompts = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        gen.prefill(model, cache, [2, 0], prompts, None)
        logits = model(torch.tensor([[11, 12], [13, 14]]), None, cache, rows=[2, 0])  # (B, T=2, V)
        for b, p in enumerate(prompts):
            want = model(torch.tensor([p + [[11, 12], [13, 14]][b]]))[0, -2:]
            torch.testing.assert_close(logits[b], want, rtol=0, atol=ATOL_REF)
