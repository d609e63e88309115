"""TrainableAdapter's one-node LoRA / DoRA linear against the formula on a materialised W + s B A with autograd.

The expected values are semantics §4.1 / §5.3 written out with plain torch ops on dense tensors
(lora_math.dora_weight_norm for the norm, detached); DoRA's magnitude has a zero entry here, the case whose
gradient cannot be taken from g * out, and the layer has a bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime.adapters.lora_math import dora_weight_norm
from adapterhub.runtime.adapters.trainable import TrainableAdapter
from adapterhub.runtime.quant import formats


def _expected(x, W, bias, A, B, s, m):
    lora = F.linear(F.linear(x, A), B) * s
    if m is None:
        return F.linear(x, W, bias) + lora
    g = m / dora_weight_norm(W, A.detach(), B.detach(), s)
    return g * (F.linear(x, W) + lora) + bias


@pytest.mark.parametrize("zero_magnitude", [False, True], ids=["dora", "dora-zero-magnitude"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_dora_output_and_gradients_match_the_formula(quantize, zero_magnitude):
    g = torch.Generator().manual_seed(0)
    Dout, Din, R, s = 48, 64, 4, 0.75
    weight = formats.format_class(quantize).quantize(torch.randn(Dout, Din, generator=g) * 0.1, dtype=torch.float32)
    W = weight.dequantize(torch.float32)
    bias = torch.randn(Dout, generator=g)
    A, B = torch.randn(R, Din, generator=g) * 0.1, torch.randn(Dout, R, generator=g) * 0.1
    m = dora_weight_norm(W, A, B, s) * (1 + 0.1 * torch.randn(Dout, generator=g))
    if zero_magnitude:
        m[3] = 0.0
    adapter = TrainableAdapter(A, B, s, magnitude=m, weight=weight)
    x = torch.randn(2, 5, Din, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 5, Dout, generator=g)
    y = adapter(x, weight, bias)
    y.backward(grad_y)

    A_, B_, m_ = (t.clone().requires_grad_(True) for t in (A, B, m))
    x_ = x.detach().clone().requires_grad_(True)
    expected = _expected(x_, W, bias, A_, B_, s, m_)
    expected.backward(grad_y)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in ((x.grad, x_.grad), (adapter.lora_A.grad, A_.grad), (adapter.lora_B.grad, B_.grad),
                         (adapter.lora_magnitude_vector.grad, m_.grad)):
        assert theirs.norm() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lora_output_and_gradients_match_the_formula_and_x_without_grad_gets_none():
    g = torch.Generator().manual_seed(1)
    Dout, Din, R, s = 40, 32, 8, 2.0
    weight = formats.format_class(None).quantize(torch.randn(Dout, Din, generator=g), dtype=torch.float32)
    bias = torch.randn(Dout, generator=g)
    A, B = torch.randn(R, Din, generator=g) * 0.1, torch.randn(Dout, R, generator=g) * 0.1
    adapter = TrainableAdapter(A, B, s)
    x = torch.randn(3, 7, Din, generator=g)  # a frozen embedding's output: no gradient wanted
    grad_y = torch.randn(3, 7, Dout, generator=g)
    y = adapter(x, weight, bias)
    y.backward(grad_y)
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    expected = _expected(x, weight.dequantize(torch.float32), bias, A_, B_, s, None)
    expected.backward(grad_y)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_A.grad, A_.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_B.grad, B_.grad, rtol=1e-5, atol=1e-6)
    assert x.grad is None
