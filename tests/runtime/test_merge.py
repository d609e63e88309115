"""Merge / unmerge (dense and NF4 bases) and combine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.adapter import Adapter, random_adapter
from adapterhub.errors import MergeError
from adapterhub.runtime.adapters import lora_math
from adapterhub.runtime.adapters.combine import combine
from adapterhub.runtime.adapters.merge import merge_adapter, unmerge
from adapters_fixtures import ALL_LINEAR, SHAPES, adapters_zoo, base_weights, make_layers, make_pool


def _outputs(layers, pool, name, g_seed=5):
    """{module: output} for one fixed input per module, rows using `name` (or the base when None)."""
    g = torch.Generator().manual_seed(g_seed)
    ids = None if name is None else pool.acquire([name, name])
    out = {m: layer(torch.randn(2, 3, layer.in_features, generator=g), ids) for m, layer in layers.items()}
    if ids is not None:
        pool.release(ids)
    return out


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_merge_equals_unmerged_forward_and_unmerge_restores(kind, bias):
    layers = make_layers(base_weights(), bias=bias)
    pool = make_pool(layers)
    zoo = adapters_zoo(layers)
    pool.add(zoo[kind], kind)
    original = {m: layer.dequantized_weight().clone() for m, layer in layers.items()}
    base = _outputs(layers, pool, None)
    with_adapter = _outputs(layers, pool, kind)
    assert any((with_adapter[m] - base[m]).abs().max() > 1e-3 for m in layers)
    report = merge_adapter(layers, pool, kind)
    assert report.name == kind and report.modules == len(zoo[kind].modules()) and not report.quantized
    assert report.max_abs_error == 0.0
    merged = _outputs(layers, pool, None)
    for m in layers:
        torch.testing.assert_close(merged[m], with_adapter[m], atol=1e-5, rtol=1e-5)
    assert unmerge(layers, pool) == kind
    for m, layer in layers.items():
        torch.testing.assert_close(layer.dequantized_weight(), original[m], atol=1e-6, rtol=0)


def test_while_merged_batches_naming_adapters_and_new_adapters_are_refused():
    layers = make_layers(base_weights())
    pool = make_pool(layers)
    zoo = adapters_zoo(layers)
    pool.add(zoo["lora"], "lora")
    merge_adapter(layers, pool, "lora")
    with pytest.raises(MergeError, match="'lora' is merged.*unmerge"):
        pool.acquire(["lora", None])
    with pytest.raises(MergeError, match="while 'lora' is merged"):
        pool.add(zoo["dora"], "dora")
    with pytest.raises(MergeError, match="already merged"):
        merge_adapter(layers, pool, "lora")
    assert pool.acquire([None]).tolist() == [0]
    unmerge(layers, pool)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        unmerge(layers, pool)


def _delta(adapter: Adapter, module: str) -> torch.Tensor:
    m = adapter.modules()[module]
    return lora_math.delta_weight(torch.from_numpy(m.lora_A), torch.from_numpy(m.lora_B), m.scaling)


def _two_loras(r1=4, r2=4):
    a = random_adapter(SHAPES, r=r1, lora_alpha=8, target_modules=ALL_LINEAR, seed=11)
    b = random_adapter(SHAPES, r=r2, lora_alpha=4, target_modules=("q_proj", "v_proj"), seed=12, use_rslora=True)
    return a, b


def test_combine_cat_is_the_exact_weighted_sum_of_deltas_and_loads():
    a, b = _two_loras(4, 8)
    out = combine([a, b], [0.7, -0.4], method="cat")
    for module in a.modules():
        expected = 0.7 * _delta(a, module) + (-0.4 * _delta(b, module) if module in b.modules() else 0)
        assert out.modules()[module].scaling == 1.0
        torch.testing.assert_close(_delta(out, module), expected, atol=1e-6, rtol=1e-5)
    q = "model.layers.0.self_attn.q_proj"
    assert out.config.rank(q) == 12 and out.config.rank("model.layers.0.mlp.up_proj") == 4
    layers = make_layers(base_weights())
    pool = make_pool(layers)
    pool.add(out, "mix")  # a combined adapter is a normal adapter


def test_combine_linear_matches_lora_math_and_svd_rank():
    a, b = _two_loras()
    out = combine([a, b], [0.5, 0.5], method="linear")
    q = "model.layers.1.self_attn.q_proj"
    ma, mb = a.modules()[q], b.modules()[q]
    A, B = lora_math.combine_factors(
        [torch.from_numpy(ma.lora_A), torch.from_numpy(mb.lora_A)], [torch.from_numpy(ma.lora_B), torch.from_numpy(mb.lora_B)],
        [ma.scaling, mb.scaling], [0.5, 0.5], "linear")
    np.testing.assert_array_equal(out.modules()[q].lora_A, A.numpy())
    np.testing.assert_array_equal(out.modules()[q].lora_B, B.numpy())
    svd = combine([a, b], [1.0, 1.0], method="linear", rank=8)
    full = _delta(a, q) + _delta(b, q)  # rank 8 at most: SVD to rank 8 reproduces it
    torch.testing.assert_close(_delta(svd, q), full, atol=1e-5, rtol=1e-4)


def test_combine_dare_is_seeded_and_errors_are_clear():
    a, b = _two_loras()
    one = combine([a, b], [1.0, 1.0], method="dare", density=0.5, seed=3)
    two = combine([a, b], [1.0, 1.0], method="dare", density=0.5, seed=3)
    q = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(one.modules()[q].lora_A, two.modules()[q].lora_A)
    with pytest.raises(MergeError, match="unknown combine method 'avg'"):
        combine([a, b], [1.0, 1.0], method="avg")
    with pytest.raises(MergeError, match="one weight per adapter"):
        combine([a, b], [1.0])
    with pytest.raises(MergeError, match="needs one rank"):
        combine(list(_two_loras(4, 8)), [1.0, 1.0], method="ties", density=0.5)
    dora = random_adapter(SHAPES, r=4, target_modules=ALL_LINEAR, use_dora=True, seed=1)
    with pytest.raises(MergeError, match="DoRA"):
        combine([a, dora], [1.0, 1.0])


def test_nf4_merge_reports_the_requantization_error_and_unmerge_restores_the_bytes():
    layers = make_layers(base_weights(), nf4=True)
    pool = make_pool(layers)
    zoo = adapters_zoo(layers)
    pool.add(zoo["dora"], "dora")
    original = {m: layer.weight.state_dict() for m, layer in layers.items()}
    exact = {m: layer.dequantized_weight() for m, layer in layers.items()}
    with_adapter = _outputs(layers, pool, "dora")
    report = merge_adapter(layers, pool, "dora")
    assert report.quantized and 0 < report.mean_abs_error <= report.max_abs_error
    # The error reported is what requantization added on top of the exact merged weight.
    m = "model.layers.0.mlp.up_proj"
    a = zoo["dora"].modules()[m]
    merged_exact, _ = lora_math.merge_dora(exact[m], torch.from_numpy(a.lora_A), torch.from_numpy(a.lora_B),
                                           a.scaling, torch.from_numpy(a.magnitude))
    assert float((layers[m].dequantized_weight() - merged_exact).abs().max()) <= report.max_abs_error
    merged = _outputs(layers, pool, None)
    for mod in layers:  # within NF4 quantization noise of the unmerged forward
        assert float((merged[mod] - with_adapter[mod]).abs().max()) < 0.25 * float(with_adapter[mod].abs().max())
    unmerge(layers, pool)
    for mod, layer in layers.items():
        for key, value in layer.weight.state_dict().items():
            assert torch.equal(value, original[mod][key]), (mod, key)
