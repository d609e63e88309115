"""Batched mixed adapters: every row of one forward gets its own adapter (LoRA, rsLoRA, DoRA, ranks 4/8/16).

Row i must equal adapter i run alone (1e-5, fp32), rows with None must equal the base, and both must
match the NumPy reference (reference/lora.py). Both CPU formulations of the LoRA ops are exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.kernels import Ops
from adapterhub.runtime.kernels.tolerance import IMPLEMENTATIONS
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from adapters_fixtures import ALL_LINEAR, QWEN2, SHAPES, adapters_zoo, base_weights, make_layers, make_pool, reference_output
from reference import llama as ref_llama

ROWS = ["lora", None, "dora", "rslora", "dora", None, "lora"]


@pytest.fixture(params=["dense_over_slots", "gathered"])
def lora_path(request) -> Ops:
    """The torch ops, pinned to one of their two CPU formulations of the LoRA ops."""
    return Ops("cpu", dense_max_rows_x_slots=10**9 if request.param == "dense_over_slots" else 0)


@pytest.fixture(params=[False, True], ids=["no_bias", "bias"])
def setup(request):
    layers = make_layers(base_weights(), bias=request.param)
    pool = make_pool(layers, capacity=4)
    zoo = adapters_zoo(layers)
    for name, adapter in zoo.items():
        pool.add(adapter, name)
    return layers, pool, zoo


@pytest.mark.parametrize("T", [1, 5])
def test_each_row_equals_its_adapter_alone_and_the_reference(setup, lora_path, T):
    layers, pool, zoo = setup
    g = torch.Generator().manual_seed(7)
    ids = pool.acquire(ROWS)
    for module, layer in layers.items():
        layer.use_ops(lora_path)
        x = torch.randn(len(ROWS), T, layer.in_features, generator=g)
        y = layer(x.clone(), ids)
        base = layer(x.clone(), None)
        # The adapters must matter, or the equalities below prove nothing.
        for b, name in enumerate(ROWS):
            if name is not None and module in zoo[name].modules():
                assert (y[b] - base[b]).abs().max() > 1e-3, (module, name)
        for b, name in enumerate(ROWS):
            alone = layer(x[b : b + 1].clone(), pool.acquire([name]))[0]
            torch.testing.assert_close(y[b], alone, atol=1e-5, rtol=1e-5)
            expected = reference_output(layer, module, x[b], None if name is None else zoo[name])
            np.testing.assert_allclose(y[b].double().numpy(), expected, atol=1e-5, rtol=1e-5)
            if name is None:
                torch.testing.assert_close(y[b], base[b], atol=0, rtol=0)


def test_decode_shaped_input_2d(setup):
    """A (B, Din) input (one token per row) gives the same rows as (B, 1, Din)."""
    layers, pool, _ = setup
    ids = pool.acquire(ROWS)
    layer = layers["model.layers.1.mlp.down_proj"]
    x = torch.randn(len(ROWS), layer.in_features)
    torch.testing.assert_close(layer(x.clone(), ids), layer(x[:, None].clone(), ids)[:, 0], atol=1e-6, rtol=1e-6)


def test_bf16_mixed_batch_close_to_reference():
    layers = make_layers(base_weights(), dtype=torch.bfloat16)
    pool = make_pool(layers, capacity=4)
    zoo = adapters_zoo(layers)
    for name, adapter in zoo.items():
        pool.add(adapter, name)
    ids = pool.acquire(ROWS)
    layer = layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(len(ROWS), 3, layer.in_features).to(torch.bfloat16)
    y = layer(x, ids)
    for b, name in enumerate(ROWS):
        expected = reference_output(layer, "model.layers.0.mlp.up_proj", x[b].float(), None if name is None else zoo[name])
        np.testing.assert_allclose(y[b].double().numpy(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [[2, 0, 5, 2, 1], [5, 5, 0, 5, 5]], ids=["most_slots", "few_slots"])
def test_lora_ops_match_their_semantics(dtype, lora_path, slots):
    """Ops.lora_shrink / lora_expand against a per-row loop written from their docstrings."""
    g = torch.Generator().manual_seed(3)
    B, T, N, R, Din, Dout = 5, 3, 6, 8, 48, 40
    x = torch.randn(B, T, Din, generator=g).to(dtype)
    A = torch.randn(N, R, Din, generator=g).to(dtype)
    Bst = torch.randn(N, R, Dout, generator=g).to(dtype)
    ids = torch.tensor(slots)
    scaling = torch.rand(N, generator=g) + 0.5
    dora = torch.rand(N, Dout, generator=g) + 0.5
    y0 = torch.randn(B, T, Dout, generator=g).to(dtype)
    h = lora_path.lora_shrink(x, A, ids)
    y = lora_path.lora_expand(y0.clone(), h, Bst, ids, scaling, dora)
    for b in range(B):
        n = ids[b]
        h_ref = (x[b].float() @ A[n].float().T).to(dtype)
        hs = (h_ref.float() * scaling[n]).to(dtype)
        v = (y0[b].float() + hs.float() @ Bst[n].float()).to(dtype)
        y_ref = (v.float() * dora[n]).to(dtype)
        tol = IMPLEMENTATIONS[dtype]
        torch.testing.assert_close(h[b], h_ref, atol=tol[0], rtol=tol[1])
        torch.testing.assert_close(y[b], y_ref, atol=tol[0] * 10, rtol=tol[1])


def test_full_model_on_an_nf4_base_matches_the_reference_llama(tmp_path):
    """fp32 compute over NF4 weights: one mixed batch (LoRA, rsLoRA, DoRA, base rows, padding) equals
    reference/llama.py run on the dequantized weights with each row's adapter (1e-5)."""
    path = random_checkpoint(tmp_path / "base", QWEN2, seed=3)
    base = load_base(path, quantize="nf4", compute_dtype=torch.float32)
    linears = base.model.linears()
    assert all(layer.weight.format == "nf4" for layer in linears.values())
    weights = {name: p.detach().double().numpy() for name, p in base.model.named_parameters()}
    weights.update({m + ".weight": layer.dequantized_weight().double().numpy() for m, layer in linears.items()})
    shapes = base.module_shapes()
    W = {m: layer.dequantized_weight().numpy() for m, layer in linears.items()}
    zoo = {
        "lora": random_adapter(shapes, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1),
        "rslora": random_adapter(shapes, r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True, seed=2),
        "dora": random_adapter(shapes, r=6, lora_alpha=12, target_modules=ALL_LINEAR, use_dora=True, seed=3, base_weights=W),
    }
    for name, adapter in zoo.items():
        base.add_adapter(adapter, name=name)
    rows = ["dora", None, "lora", "rslora"]
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, QWEN2.vocab_size, (len(rows), 6), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 4:] = 0
    mask[2, 5:] = 0
    ours = base(input_ids, adapters=rows, attention_mask=mask)
    per_row = [None if n is None else {m: (a.lora_A, a.lora_B, a.scaling, a.magnitude) for m, a in zoo[n].modules().items()}
               for n in rows]
    config = json.loads((path / "config.json").read_text())
    expected = ref_llama.forward(config, weights, input_ids.numpy(), mask.numpy(), per_row)
    assert (ours[0] - base(input_ids[:1])[0]).abs().max() > 1e-3
    keep = mask.bool()
    np.testing.assert_allclose(ours[keep].double().numpy(), expected[keep.numpy()], atol=1e-5, rtol=1e-5)
