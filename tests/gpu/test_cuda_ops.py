"""The CUDA ops (runtime/kernels/cuda.py, cuda/csrc) against their torch twins (kernels/ops.py) at Llama shapes.

The twin runs on CPU copies of the inputs (tests/cuda_semantics.py). Tolerances: kernels/tolerance.py's
IMPLEMENTATIONS, the one table. Shapes: Llama-2-7B / Llama-3-8B projections
(D = 4096, F = 11008), 32..128 rows, ranks 8..64, 33 slots (32 adapters + slot 0), bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.runtime.kernels import cuda as cuda_ops
from adapterhub.runtime.kernels.tolerance import IMPLEMENTATIONS
from tests.cuda_semantics import twin, expand_semantics

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
D, F = 4096, 11008
SLOTS = 33  # slot 0 = no adapter, then 32 distinct adapters
G = 64  # QLoRA block size


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_ops.available(), "the CUDA ops failed to build or load; see the warning above"


def _assert_close(actual, expected, dtype):
    atol, rtol = IMPLEMENTATIONS[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.float(), atol=atol, rtol=rtol)


def _nf4_weight(Dout, Din, seed):
    """packed (Dout*Din/2,) uint8 and absmax (Dout*Din/G,) fp32 of a random NF4 weight on the GPU."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (Dout * Din // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(Dout * Din // G, generator=g) * 0.08 + 0.01  # weights of magnitude ~0.05
    return packed.cuda(), absmax.cuda()


def _stacks(R, Din, Dout, dtype, seed):
    """A (N, R, Din), B (N, R, Dout), scaling (N,), dora_scale (N, Dout); slot 0 = no adapter."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(SLOTS, R, Din, generator=g) * 2 - 1) / Din**0.5  # kaiming-uniform-like
    B = (torch.rand(SLOTS, R, Dout, generator=g) * 2 - 1) / R**0.5  # non-zero B: the adapters act
    A[0], B[0] = 0, 0
    scaling = torch.rand(SLOTS, generator=g) + 0.5
    dora = torch.rand(SLOTS, Dout, generator=g) * 0.4 + 0.8
    dora[0] = 1
    return A.to(dtype).cuda(), B.to(dtype).cuda(), scaling.cuda(), dora.cuda()


def _ids(Bsz, seed):
    """One slot per row: every adapter used, slot 0 at row 1 (a base-only row inside the batch)."""
    ids = torch.randint(1, SLOTS, (Bsz,), generator=torch.Generator().manual_seed(seed))
    ids[1] = 0
    return ids.cuda()


def _cpu(*tensors):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
@pytest.mark.parametrize("Dout, Din", [(D, D), (F, D), (D, F)])
def test_nf4_dequantize_is_bit_exact(dtype, Dout, Din):
    packed, absmax = _nf4_weight(Dout, Din, seed=Dout + Din)
    out = cuda_ops.nf4_dequantize(packed, absmax, G, torch.empty(Dout, Din, dtype=dtype, device="cuda"))
    expected = twin.nf4_dequantize(*_cpu(packed, absmax), G, torch.empty(Dout, Din, dtype=dtype))
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 8, 32, 128])  # <= 8: the fused GEMV; above: dequantize + GEMM
@pytest.mark.parametrize("Dout, Din", [(D, D), (F, D), (D, F)])
def test_nf4_linear_matches_twin(dtype, rows, Dout, Din):
    packed, absmax = _nf4_weight(Dout, Din, seed=rows)
    x = torch.randn(rows, 1, Din, generator=torch.Generator().manual_seed(rows)).to(dtype).cuda()  # (B, T, Din)
    y = cuda_ops.nf4_linear(x, packed, absmax, G, Dout, Din)
    expected = twin.nf4_linear(*_cpu(x, packed, absmax), G, Dout, Din)
    assert y.shape == (rows, 1, Dout) and expected.abs().max() > 1
    _assert_close(y, expected, dtype)


def test_nf4_linear_accepts_an_offset_view():
    """A contiguous view at an odd offset is not 16-byte aligned: nf4_linear takes the dequantize path."""
    packed, absmax = _nf4_weight(D, D, seed=3)
    x = torch.randn(1, D + 1, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).cuda()[:, 1:]
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    y = cuda_ops.nf4_linear(x, packed, absmax, G, D, D)
    _assert_close(y, twin.nf4_linear(*_cpu(x.contiguous(), packed, absmax), G, D, D), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 16, 33])  # several 8-row tiles, and a partial one
def test_nf4_gemv_at_any_row_count_matches_twin(dtype, rows):
    packed, absmax = _nf4_weight(F, D, seed=rows)
    x = torch.randn(rows, D, generator=torch.Generator().manual_seed(rows)).to(dtype).cuda()
    y = cuda_ops.nf4_gemv(x, packed, absmax, G, F)
    expected = twin.nf4_linear(*_cpu(x, packed, absmax), G, F, D)
    _assert_close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bsz, T", [(32, 1), (128, 1), (4, 16)])  # decode rows; prefill rows
@pytest.mark.parametrize("R", [8, 16, 64])
@pytest.mark.parametrize("Din", [D, F])
def test_lora_shrink_matches_twin(dtype, Bsz, T, R, Din):
    A, _, _, _ = _stacks(R, Din, 16, dtype, seed=R)
    x = torch.randn(Bsz, T, Din, generator=torch.Generator().manual_seed(Bsz)).to(dtype).cuda()
    ids = _ids(Bsz, seed=T)
    h = cuda_ops.lora_shrink(x, A, ids)
    expected = twin.lora_shrink(*_cpu(x, A, ids))
    assert expected[0].abs().max() > 0.1 and torch.all(expected[1] == 0)  # adapter rows act, slot 0 not
    _assert_close(h, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bsz, T", [(32, 1), (128, 1), (4, 16)])
@pytest.mark.parametrize("R", [8, 16, 64])
@pytest.mark.parametrize("Dout", [D, F])
@pytest.mark.parametrize("is_dora", [False, True])
def test_lora_expand_matches_twin(dtype, Bsz, T, R, Dout, is_dora):
    _, B, scaling, dora = _stacks(R, 16, Dout, dtype, seed=R + Dout)
    g = torch.Generator().manual_seed(Bsz * T)
    y0 = torch.randn(Bsz, T, Dout, generator=g).to(dtype).cuda()
    h = torch.randn(Bsz, T, R, generator=g).to(dtype).cuda()
    ids = _ids(Bsz, seed=R)
    dora_scale = dora if is_dora else None
    y = cuda_ops.lora_expand(y0.clone(), h, B, ids, scaling, dora_scale)
    expected = twin.lora_expand(*_cpu(y0.clone(), h, B, ids, scaling, dora_scale))
    assert not torch.equal(expected[0], y0[0].cpu()) and torch.equal(expected[1], y0[1].cpu())
    _assert_close(y, expected, dtype)
    # The kernel mirrors every rounding of the Semantics; only the order of the R fp32 products differs.
    literal = expand_semantics(*_cpu(y0, h, B, ids, scaling, dora_scale))
    assert (y.cpu() == literal).float().mean() > 0.95


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_lora_equals_one_adapter_at_a_time(dtype):
    """Mixed batch == each row alone through its own adapter (the per-row gather, no cross-talk)."""
    Bsz, R = 32, 16
    A, B, scaling, dora = _stacks(R, D, D, dtype, seed=5)
    x = torch.randn(Bsz, 1, D, generator=torch.Generator().manual_seed(5)).to(dtype).cuda()
    base = torch.randn(Bsz, 1, D, generator=torch.Generator().manual_seed(6)).to(dtype).cuda()
    ids = _ids(Bsz, seed=5)
    batched = cuda_ops.lora_expand(base.clone(), cuda_ops.lora_shrink(x, A, ids), B, ids, scaling, dora)
    assert not torch.equal(batched, base)
    for b in range(Bsz):
        one = ids[b : b + 1]
        alone = cuda_ops.lora_expand(base[b : b + 1].clone(), cuda_ops.lora_shrink(x[b : b + 1], A, one), B, one,
                                     scaling, dora)
        assert torch.equal(alone, batched[b : b + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_captures_in_a_cuda_graph(dtype):
    """Launches go to the current stream, so a CUDA graph captures them (a launch on the legacy default
    stream would break the capture), and a replay equals the eager result (decode loops replay graphs)."""
    Bsz, R = 8, 16
    packed, absmax = _nf4_weight(D, D, seed=1)
    A, B, scaling, dora = _stacks(R, D, D, dtype, seed=1)
    x = torch.randn(Bsz, 1, D, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    ids = _ids(Bsz, seed=1)

    def step():  # one adapter linear at decode: NF4 GEMV, then batched LoRA + DoRA
        y = cuda_ops.nf4_linear(x, packed, absmax, G, D, D)
        return cuda_ops.lora_expand(y, cuda_ops.lora_shrink(x, A, ids), B, ids, scaling, dora)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_bad_arguments_raise_with_the_values():
    packed, absmax = _nf4_weight(D, D, seed=0)
    with pytest.raises(RuntimeError, match=r"absmax must have 262144 elements"):
        cuda_ops.nf4_dequantize(packed, absmax[:-1], G, torch.empty(D, D, dtype=torch.bfloat16, device="cuda"))
    A, _, _, _ = _stacks(8, D, 16, torch.bfloat16, seed=0)
    x = torch.randn(2, 1, D, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=r"ids must be Long"):
        cuda_ops.lora_shrink(x, A, torch.zeros(2, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"x and A_stack must have one dtype"):
        cuda_ops.lora_shrink(x.half(), A, torch.zeros(2, dtype=torch.long, device="cuda"))
