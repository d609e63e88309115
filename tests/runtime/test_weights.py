"""The base-weight protocol (runtime/quant/weight.py), checked the same way for every format in quant/formats.py.

Each format must: satisfy `BaseWeight`; multiply like F.linear on its own dequantized weight, on the
device's ops and on the torch twin; round-trip its state dict bit for bit; requantize with its own
settings in `replaced_by`; and let gradients through to whatever produced x (training runs LoRA / DoRA
parameters through a frozen base), on the torch path the ops fall back to when autograd is on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime.kernels import Ops, ops_for
from adapterhub.runtime.quant import formats
from adapterhub.runtime.quant.nf4 import NF4
from adapterhub.runtime.quant.weight import BaseWeight

FORMATS = list(formats.FORMATS)
Dout, Din = 96, 128


def _weight(fmt: str, dtype=torch.float32, seed=0) -> tuple[BaseWeight, torch.Tensor]:
    W = torch.randn(Dout, Din, generator=torch.Generator().manual_seed(seed)) / Din**0.5
    return formats.FORMATS[fmt].quantize(W, dtype=dtype), W


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_satisfies_the_protocol(fmt):
    w, W = _weight(fmt)
    assert isinstance(w, BaseWeight) and w.format == fmt and tuple(w.shape) == (Dout, Din)
    assert w.is_quantized == (fmt != "dense")
    assert w.device.type == "cpu" and 0 < w.nbytes <= Dout * Din * 4
    deq = w.dequantize(torch.float32)
    error = (deq - W).abs().max()
    assert error == 0 if fmt == "dense" else 0 < error < 0.25 * W.abs().max()  # quantized: lossy, not garbage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_matmul_is_linear_on_the_dequantized_weight(fmt, dtype, rows):
    w, _ = _weight(fmt, dtype)
    x = torch.randn(rows, Din, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(Dout).to(dtype)
    expected = F.linear(x.float(), w.dequantize(dtype).float(), bias.float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # fused kernels: other fp32 summation order
    for y in (w.matmul(x, bias), F.linear(x, w.dequantize(dtype), bias)):
        assert y.dtype == dtype and y.shape == (rows, Dout)
        torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if formats.FORMATS[f].is_quantized])
def test_quantized_formats_agree_with_their_torch_twin(fmt):
    w, _ = _weight(fmt, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fast = w.dequantize_into(torch.empty(Dout, Din, dtype=dtype), ops_for("cpu"))
        twin = w.dequantize_into(torch.empty(Dout, Din, dtype=dtype), Ops("cpu"))
        assert torch.equal(fast, twin), dtype
    x = torch.randn(3, Din, dtype=torch.bfloat16)
    torch.testing.assert_close(w.linear(x, ops_for("cpu")), w.linear(x, Ops("cpu")), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trips_bit_for_bit(fmt):
    w, _ = _weight(fmt, torch.bfloat16)
    prefix = "model.layers.0.mlp.up_proj."
    sd = w.state_dict(prefix)
    assert all(k.startswith(prefix + "weight") for k in sd)
    back = type(w).from_state_dict(sd, prefix, dtype=torch.bfloat16)
    for key, value in back.state_dict(prefix).items():
        assert torch.equal(value, sd[key]), key
    assert torch.equal(back.dequantize(torch.float32), w.dequantize(torch.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_replaced_by_keeps_the_format_and_its_settings(fmt):
    w, W = _weight(fmt, torch.bfloat16)
    W2 = W + 0.01
    new = w.replaced_by(W2)
    assert type(new) is type(w) and new.shape == w.shape
    for field in ("blocksize", "double_quant", "dtype"):
        assert getattr(new, field, None) == getattr(w, field, None)
    assert torch.equal(new.dequantize(torch.float32), formats.FORMATS[fmt].quantize(W2, dtype=torch.bfloat16)
                       .dequantize(torch.float32))
    with pytest.raises(ValueError, match="shape"):
        w.replaced_by(torch.zeros(Dout + 1, Din))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradients_reach_the_adapter_through_a_frozen_base(fmt):
    """A LoRA layer written with the runtime's ops: y = base(x) + s * (x A^T) B^T, two layers deep so the
    gradient of the first adapter flows through the second layer's frozen base. Grads equal autograd
    through an fp32 dense copy of the same (dequantized) weights; the base gets none."""
    ops = ops_for("cpu")
    g = torch.Generator().manual_seed(2)
    w1, _ = _weight(fmt, seed=3)
    w2 = formats.FORMATS[fmt].quantize(torch.randn(Din, Dout, generator=g) / Dout**0.5, dtype=torch.float32)
    A = (torch.randn(1, 4, Din, generator=g) * 0.1).requires_grad_()  # (N=1, R, Din) stack: slot 0 only
    Bt = (torch.randn(1, 4, Dout, generator=g) * 0.1).requires_grad_()  # (N, R, Dout), non-zero: the adapter acts
    x = torch.randn(2, 3, Din, generator=g)
    ids = torch.zeros(2, dtype=torch.int64)
    scaling = torch.tensor([2.0])

    def forward(first, second):
        y = first(x)  # (B, T, Dout)
        y = ops.lora_expand(y, ops.lora_shrink(x, A, ids), Bt, ids, scaling)
        return second(torch.tanh(y)).pow(2).sum()

    forward(w1.matmul, w2.matmul).backward()
    got = A.grad.clone(), Bt.grad.clone()
    A.grad = Bt.grad = None
    W1, W2 = w1.dequantize(torch.float32), w2.dequantize(torch.float32)
    forward(lambda t: t @ W1.T, lambda t: t @ W2.T).backward()
    assert got[0].abs().max() > 0 and got[1].abs().max() > 0
    torch.testing.assert_close(got[0], A.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], Bt.grad, atol=1e-5, rtol=1e-4)
    assert not any(t.requires_grad for t in w1.state_dict().values() if t.is_floating_point())


def test_unknown_format_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="quantize='int3' is not supported; use None or one of"):
        formats.format_class("int3")


def test_the_torch_twin_quantizes_and_dequantizes_inside_inference_mode_as_outside():
    # Ops.run_chunks runs on worker threads: they must run in the caller's autograd mode, or the in-place
    # writes into buffers made under inference_mode are refused (a weight quantized in a serving thread).
    ops = Ops("cpu")
    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(0))  # several run_chunks steps
    packed, absmax = ops.quantize_blockwise(x, NF4, 64)
    with torch.inference_mode():
        packed_i, absmax_i = ops.quantize_blockwise(x, NF4, 64)
        out = ops.dequantize_4bit(packed_i, absmax_i, NF4, 64, torch.empty_like(x))
    assert torch.equal(packed, packed_i) and torch.equal(absmax, absmax_i)
    assert torch.equal(out, ops.dequantize_4bit(packed, absmax, NF4, 64, torch.empty_like(x)))
