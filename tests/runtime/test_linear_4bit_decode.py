"""The fused 4-bit linear for decode batches (kernels/compiled.py linear_4bit, CpuOps.linear_4bit) against
independent computations, with the VDPBF16PS path on and forced off.

Reference: W = CODE[q] * absmax in fp32 (semantics §1.5), rounded to x's dtype, then F.linear with fp32
sums; the bound is kernels/tolerance.py's FUSED_LINEAR. The dispatcher (fused up to fused_4bit_rows, the
compiled dequantize + GEMM above) is compared with the torch twin, ``Ops.linear_4bit``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Ops, build, compiled
from adapterhub.runtime.kernels.tolerance import FUSED_LINEAR
from adapterhub.runtime.quant.nf4 import NF4
from adapterhub.runtime.quant.tables import FP4_CODE

LIB = compiled.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="compiled CPU kernels unavailable")
CODE = NF4.values
DTYPES = [torch.bfloat16, torch.float32]
# (N, K): N odd, K a multiple of 64 but not of 128, a 135M k/v projection, a long K with few rows of W.
SHAPES = [(37, 192), (5, 4160), (192, 576), (64, 1536)]


@pytest.fixture(params=["dpbf16", "fma"])
def path(request):
    """The bf16 path under test: VDPBF16PS where the CPU has it ('dpbf16'), or forced off ('fma')."""
    if request.param == "dpbf16" and not LIB.has_dpbf16:
        pytest.skip("no AVX512-BF16 here")
    was_on = LIB.use_dpbf16()
    LIB.use_dpbf16(request.param == "dpbf16")
    yield request.param
    LIB.use_dpbf16(was_on)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (n,) uint8 in [0, 16) -> (n/2,) bytes, element 2k in the high nibble (semantics §1.4)."""
    return (codes[0::2] << 4) | codes[1::2]


def random_weight(N: int, K: int, g: torch.Generator, code=CODE, scale=None):
    """(packed, absmax, W (N, K) fp32): random codes; absmax 0.01..0.21 per block, or `scale` (N*K/64,)."""
    codes = torch.randint(0, 16, (N * K,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(N * K // 64, generator=g) * 0.2 + 0.01 if scale is None else scale
    return pack(codes), absmax, (code[codes.long()] * absmax.repeat_interleave(64)).reshape(N, K)


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> None:
    ref = F.linear(x.float(), W.to(x.dtype).float())  # (M, N): the weight the torch path sees, fp32 sums
    bound = FUSED_LINEAR[x.dtype] * (x.float().abs() @ W.to(x.dtype).float().abs().T)
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, bound there {bound[err > bound][0].item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 13, 16, 17, 33])
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("code", [CODE, FP4_CODE], ids=["nf4", "fp4"])
def test_kernel_matches_dequantize_then_linear(path, dtype, M, N, K, code):
    g = torch.Generator().manual_seed(N * K + M)
    packed, absmax, W = random_weight(N, K, g, code)
    x = torch.randn(M, K, generator=g).to(dtype)
    y = LIB.linear_4bit(x, packed, absmax, code, N, K)
    assert y.shape == (M, N) and y.dtype == dtype and y.abs().max() > 0
    assert_within_bound(y, x, W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 16])
def test_adversarial_scales_cancellation_and_zero_rows(path, dtype, M):
    # absmax over 12 decades, x over 8, signs that cancel, an all-zero block (absmax 0) and a row of W that is
    # all code 7 (0.0 in NF4), whose outputs must be exactly zero.
    N, K = 23, 320
    g = torch.Generator().manual_seed(M)
    scale = 10.0 ** (torch.rand(N * K // 64, generator=g) * 12 - 6)
    scale[3] = 0.0
    packed, absmax, W = random_weight(N, K, g, scale=scale)
    packed[: K // 2] = 0x77
    W[0] = 0.0
    x = torch.randn(M, K, generator=g) * 10.0 ** (torch.rand(M, K, generator=g) * 8 - 4)
    x[:, 1::2] = -x[:, 0::2]  # pairs of opposite sign: large terms cancel within a block
    x = x.to(dtype)
    y = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
    assert (y[:, 0] == 0).all()
    assert_within_bound(y, x, W)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_its_batch(path, dtype):
    # Each (row of x, row of W) has one accumulator whatever tile it lands in: bit-identical alone or batched.
    N, K, M = 45, 384, 19
    g = torch.Generator().manual_seed(3)
    packed, absmax, _ = random_weight(N, K, g)
    x = torch.randn(M, K, generator=g).to(dtype)
    y = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
    alone = torch.cat([LIB.linear_4bit(x[m : m + 1], packed, absmax, CODE, N, K) for m in range(M)])
    assert torch.equal(y, alone)


@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("N, K", [(37, 192), (1029, 576), (300, 8192)])
def test_prefetch_and_thread_count_change_no_bit(M, N, K):
    # Where the VDPBF16PS path prefetches W (L2, or L1 as before) and how many threads split N (a last partial
    # tile at 1029; prefetches past the last row at 37 and 300) may change no result, which stays within the
    # bound of the torch path.
    if not LIB.has_dpbf16:
        pytest.skip("no AVX512-BF16 here")
    g = torch.Generator().manual_seed(N + M)
    packed, absmax, W = random_weight(N, K, g)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    assert LIB.prefetch_l2()  # the default
    try:
        y = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
        torch.set_num_threads(1)
        one_thread = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
        torch.set_num_threads(threads)
        assert not LIB.prefetch_l2(False)
        into_l1 = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
    finally:
        torch.set_num_threads(threads)
        LIB.prefetch_l2(True)
    assert torch.equal(y, one_thread) and torch.equal(y, into_l1)
    assert_within_bound(y, x, W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 15, 16, 17, 32, 40])
def test_cpu_ops_match_the_torch_twin(path, dtype, rows):
    # CpuOps takes the fused kernel up to fused_4bit_rows[dtype], then the compiled dequantize + GEMM.
    ops = kernels.ops_for("cpu")
    N, K = 96, 576
    g = torch.Generator().manual_seed(rows)
    packed, absmax, W = random_weight(N, K, g)
    x = torch.randn(2, rows, K, generator=g).to(dtype)  # (B, T, D)
    y = ops.linear_4bit(x, packed, absmax, NF4, 64, N, K)
    twin = Ops("cpu").linear_4bit(x, packed, absmax, NF4, 64, N, K)
    assert y.shape == twin.shape == (2, rows, N) and y.dtype == dtype
    bound = FUSED_LINEAR[dtype] * (x.float().abs() @ W.to(dtype).float().abs().T)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 0.0  # the twin's own output rounding
    assert ((y.float() - twin.float()).abs() <= bound + ulp * twin.float().abs()).all()


def test_decode_batches_take_the_fused_kernel_where_the_cpu_has_avx512_bf16():
    # Without AMX, bf16 decode batches of up to 16 rows run on VDPBF16PS; losing it costs 2-3x per step.
    flags = build.cpu_flags().split()
    if "avx512_bf16" not in flags or "amx_bf16" in flags:
        pytest.skip("no AVX512-BF16 here, or AMX takes bf16 decode batches")
    ops = kernels.ops_for("cpu")
    assert LIB.has_dpbf16 and LIB.use_dpbf16()
    assert ops.fused_4bit_rows == {torch.bfloat16: 16, torch.float32: 16}
