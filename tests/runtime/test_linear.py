"""AdapterLinear base paths: dense and NF4 (dequantize bit-identical to reference/nf4.py, both forward
paths, state dict round trip), and LoRA / DoRA over an NF4 base against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.kernels import Ops, ops_for
from adapterhub.runtime.kernels.tolerance import FUSED_LINEAR
from adapterhub.runtime.quant.nf4 import NF4, NF4Weight
from adapters_fixtures import adapters_zoo, base_weights, make_layers, make_pool, reference_output
from reference import nf4 as ref_nf4


def _nf4_layer(Dout=96, Din=128, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(Dout, Din, generator=g) / Din**0.5
    b = torch.randn(Dout, generator=g) * 0.1 if bias else None
    return AdapterLinear.from_dense(W, b, dtype=dtype, quantize="nf4")


def test_dense_forward_is_linear_plus_bias_for_3d_and_2d_inputs():
    w, b = torch.randn(24, 32, dtype=torch.float64), torch.randn(24)
    layer = AdapterLinear.from_dense(w, b, dtype=torch.float32)
    assert layer.weight.format == "dense" and layer.dequantized_weight().dtype == torch.float32
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), F.linear(x, w.float(), b), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x[:, 0]), F.linear(x[:, 0], w.float(), b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantized_weight_is_bit_identical_to_the_reference(dtype):
    layer = _nf4_layer(dtype=dtype)
    state = {k: v.numpy() for k, v in layer.weight.state_dict().items()}
    expected = torch.from_numpy(np.asarray(ref_nf4.dequantize(state), dtype=np.float32)).to(dtype)  # fp32, then RNE
    got = layer.dequantized_weight()
    assert got.dtype == dtype and got.shape == (96, 128)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantize_paths_agree_bit_for_bit(dtype):
    layer = _nf4_layer(dtype=torch.bfloat16)
    fast = layer.weight.dequantize_into(torch.empty(96, 128, dtype=dtype), ops_for("cpu"))
    twin = layer.weight.dequantize_into(torch.empty(96, 128, dtype=dtype), Ops("cpu"))  # the torch path
    assert torch.equal(fast, twin) and fast.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # fused CPU kernel for few rows, dequantize + GEMM for many
def test_nf4_forward_matches_dense_forward_on_the_dequantized_weight(dtype, rows):
    layer = _nf4_layer(dtype=dtype)
    x = torch.randn(rows, 1, 128).to(dtype)
    W = layer.dequantized_weight().float()
    expected = F.linear(x.float(), W, layer.bias.float())
    # the fused path's bound (|x| @ |W|^T scaled), plus the rounding of y to the output dtype.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    bound = FUSED_LINEAR[dtype] * (x.float().abs() @ W.abs().T) + ulp * expected.abs() + 1e-6
    assert ((layer(x).float() - expected).abs() <= bound).all()


def test_nf4_state_dict_round_trip_keeps_bytes():
    layer = _nf4_layer(dtype=torch.bfloat16)
    sd = layer.weight.state_dict("model.layers.0.mlp.up_proj.")
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in sd
    again = AdapterLinear(NF4Weight.from_state_dict(sd, "model.layers.0.mlp.up_proj."), dtype=torch.bfloat16)
    for key, value in again.weight.state_dict("model.layers.0.mlp.up_proj.").items():
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


def test_a_device_without_its_own_ops_gets_the_torch_ops():
    """A device without kernels (CUDA without the extension; here: meta) resolves to the torch Ops, whose
    4-bit ops run on any device; the compiled CPU kernels, which refuse non-CPU tensors, are never asked."""
    ops = ops_for("meta")
    assert type(ops) is Ops and ops is ops_for(torch.device("meta"))  # resolved once per device
    q = NF4Weight.quantize(torch.randn(128, 64).bfloat16())
    meta = [t.to("meta") for t in (torch.randn(2, 64, dtype=torch.bfloat16), q.packed, q.absmax_f32)]
    y = ops.linear_4bit(*meta, NF4, 64, 128, 64)
    assert y.device.type == "meta" and y.shape == (2, 128) and y.dtype == torch.bfloat16
    out = ops.dequantize_4bit(meta[1], meta[2], NF4, 64, torch.empty(128, 64, dtype=torch.bfloat16, device="meta"))
    assert out.device.type == "meta" and out.shape == (128, 64)
