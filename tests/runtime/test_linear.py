"""AdapterLinear base paths: dense and NF4 (dequantize bit-identical to reference/nf4.py, both forward
paths, state dict round trip), and LoRA / DoRA over an NF4 base against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime import cpu_kernels
from adapterhub.runtime.linear import AdapterLinear
from adapters_fixtures import adapters_zoo, base_weights, make_layers, make_pool, reference_output

ref_nf4 = pytest.importorskip("reference.nf4")


def _nf4_layer(Dout=96, Din=128, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = AdapterLinear(Din, Dout, bias, dtype=dtype)
    layer.load_nf4(torch.randn(Dout, Din, generator=g) / Din**0.5)
    if bias:
        layer.bias.data = torch.randn(Dout, generator=g).to(dtype) * 0.1
    return layer


def test_dense_forward_is_linear_plus_bias_for_3d_and_2d_inputs():
    layer = AdapterLinear(32, 24, True, dtype=torch.float32)
    w, b = torch.randn(24, 32, dtype=torch.float64), torch.randn(24)
    layer.load_dense(w)
    layer.bias.data = b
    assert layer.weight.dtype == torch.float32
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), F.linear(x, w.float(), b), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x[:, 0]), F.linear(x[:, 0], w.float(), b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantized_weight_is_bit_identical_to_the_reference(dtype):
    layer = _nf4_layer(dtype=dtype)
    state = {k: v.numpy() for k, v in layer.nf4_state_dict().items() if k != "bias"}
    expected = torch.from_numpy(np.asarray(ref_nf4.dequantize(state), dtype=np.float32)).to(dtype)  # fp32, then RNE
    got = layer.dequantized_weight()
    assert got.dtype == dtype and got.shape == (96, 128)
    assert torch.equal(got, expected)


def test_nf4_dequantize_paths_agree_bit_for_bit(monkeypatch):
    layer = _nf4_layer(dtype=torch.bfloat16)
    fast = layer.dequantized_weight()
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # the torch fallback
    assert torch.equal(layer.dequantized_weight(), fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # fused CPU kernel for few rows, dequantize + GEMM for many
def test_nf4_forward_matches_dense_forward_on_the_dequantized_weight(dtype, rows):
    layer = _nf4_layer(dtype=dtype)
    x = torch.randn(rows, 1, 128).to(dtype)
    W = layer.dequantized_weight().float()
    expected = F.linear(x.float(), W, layer.bias.float())
    # cpu_kernels' bound for the fused path (|x| @ |W|^T scaled), plus the rounding of y to the output dtype.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    bound = cpu_kernels.TOLERANCE[dtype] * (x.float().abs() @ W.abs().T) + ulp * expected.abs() + 1e-6
    assert ((layer(x).float() - expected).abs() <= bound).all()


def test_nf4_state_dict_round_trip_keeps_bytes():
    layer = _nf4_layer(dtype=torch.bfloat16)
    sd = layer.nf4_state_dict("model.layers.0.mlp.up_proj.")
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in sd
    again = AdapterLinear(128, 96, True, dtype=torch.bfloat16)
    again.load_nf4({k.removeprefix("model.layers.0.mlp.up_proj."): v for k, v in sd.items()})
    for key, value in again.nf4_state_dict("model.layers.0.mlp.up_proj.").items():
        assert torch.equal(value, sd[key]), key
    assert torch.equal(again.dequantized_weight(), layer.dequantized_weight())


def test_lora_and_dora_over_an_nf4_base_match_the_reference():
    layers = make_layers(base_weights(), nf4=True, bias=True)
    pool = make_pool(layers, capacity=4)
    zoo = adapters_zoo(layers)
    for name, adapter in zoo.items():
        pool.add(adapter, name)
    rows = ["dora", "lora", None, "rslora"]
    ids = pool.acquire(rows)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = layers[module]
        x = torch.randn(len(rows), 2, layer.in_features)
        y, base = layer(x, ids), layer(x, None)
        for b, name in enumerate(rows):
            if name is not None and module in zoo[name].modules():
                assert (y[b] - base[b]).abs().max() > 1e-3
            expected = reference_output(layer, module, x[b], None if name is None else zoo[name])
            np.testing.assert_allclose(y[b].double().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_non_cpu_tensors_never_reach_the_compiled_cpu_kernels():
    """A device without its own ops (CUDA without the extension; here: meta) takes the torch code.
    Before the guard, kernels.nf4_* sent such tensors to cpu_kernels, which refuses them."""
    from adapterhub.runtime import kernels, nf4

    q = nf4.quantize(torch.randn(128, 64).bfloat16())
    absmax = q.absmax_float32()
    meta = [t.to("meta") for t in (torch.randn(2, 64, dtype=torch.bfloat16), q.packed, absmax)]
    y = kernels.nf4_linear(*meta, 64, 128, 64)
    assert y.device.type == "meta" and y.shape == (2, 128) and y.dtype == torch.bfloat16
    out = kernels.nf4_dequantize(meta[1], meta[2], 64, torch.empty(128, 64, dtype=torch.bfloat16, device="meta"))
    assert out.device.type == "meta" and out.shape == (128, 64)
