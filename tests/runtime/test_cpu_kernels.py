"""The compiled CPU NF4 kernels against an independent torch computation of the same semantics.

Reference: W[i] = CODE[q_i] * absmax[i // 64] in fp32 (semantics §1.5), rounded to the compute dtype,
then F.linear. The test packs its own codes (semantics §1.4, checked against the golden bytes) so it
does not depend on the quantizer. The kernels' quantize (and NF4Weight on top of the kernels) is compared
bit for bit with the torch Ops' encoder, which tests/nf4 checks against reference/nf4.py.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapterhub.errors import QuantizationError
from adapterhub.runtime import kernels
from adapterhub.runtime.kernels import Ops, blockwise, build, compiled
from adapterhub.runtime.kernels.tolerance import FUSED_LINEAR
from adapterhub.runtime.quant.nf4 import NF4, NF4Weight
from adapterhub.runtime.quant.tables import BLOCKSIZES, FP4_CODE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# semantics §1.1, as float32.
CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)


def _expected_available() -> bool:
    return (
        platform.system() == "Linux"
        and platform.machine() == "x86_64"
        and "avx512f" in build.cpu_flags()
        and shutil.which(os.environ.get("CC", "cc")) is not None
        and os.environ.get("ADAPTERHUB_DISABLE_CPU_KERNELS", "") in ("", "0")
    )


def test_builds_where_it_should():
    # CI on x86-64 Linux with a compiler must not silently fall back to the torch path: NF4 kernels on any
    # AVX-512 CPU, the LoRA kernels where it has AVX-512 BW, and the CPU's ops are the compiled ones.
    if not _expected_available():
        pytest.skip("no x86-64 Linux / AVX-512 / C compiler here: the torch path is expected")
    assert compiled.library() is not None
    assert compiled.library().has_lora == ("avx512bw" in build.cpu_flags().split())
    ops = kernels.ops_for("cpu")
    assert ops.name == "cpu-compiled" and ops.has_compiled_lora == compiled.library().has_lora


def test_amx_is_used_where_the_cpu_has_it():
    # bf16 decode batches (2..32 rows) run on AMX tiles; a lost AMX permission would silently cost 5-8x.
    if not (_expected_available() and "amx_bf16" in build.cpu_flags().split()):
        pytest.skip("no AMX here")
    assert LIB.fused_max_rows == 32 and LIB.has_amx_lora and kernels.ops_for("cpu").fused_4bit_max_rows == 32


LIB = compiled.library()
needs_kernels = pytest.mark.skipif(LIB is None, reason="compiled CPU kernels unavailable")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (n,) uint8 in [0, 16) -> (n/2, 1) bytes, element 2k in the high nibble (semantics §1.4)."""
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


# The kernels take any 16-value codebook: NF4's (semantics §1.1) and FP4's (§11.1, not sorted, two zeros).
CODEBOOKS = {"nf4": CODE, "fp4": FP4_CODE}


def weight(codes: torch.Tensor, absmax: torch.Tensor, N: int, K: int, code=CODE) -> torch.Tensor:
    return (code[codes.long()] * absmax.repeat_interleave(64)).reshape(N, K)  # (N, K) fp32


def random_4bit(N: int, K: int, seed: int, tiny_block: bool = False, code=CODE):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N * K,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(N * K // 64, generator=g) * 0.2 + 0.01
    absmax[1] = 0.0  # an all-zero block stores absmax 0 (semantics §1.3)
    if tiny_block:
        absmax[2] = 1e-38  # products below the bf16 normal range
    return pack(codes), absmax, weight(codes, absmax, N, K, code)


def test_pack_matches_semantics_golden_bytes():
    assert pack(torch.arange(16, dtype=torch.uint8)).flatten().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_computed_linear(dtype):
    # Row 0: all codes 15 (1.0) with absmax 0.5; row 1: codes 0..15 repeated, absmax 2 then 4.
    codes = torch.cat([torch.full((64,), 15), torch.arange(16).repeat(4), torch.arange(16).repeat(4)]).to(torch.uint8)
    N, K = 1, 64
    absmax = torch.tensor([0.5, 2.0, 4.0])
    x = torch.ones(1, 64, dtype=dtype)
    y0 = LIB.linear_4bit(x, pack(codes[:64]), absmax[:1], CODE, N, K)
    assert y0.item() == 32.0  # 64 * 1.0 * 0.5
    x2 = torch.ones(1, 128, dtype=dtype)
    y1 = LIB.linear_4bit(x2, pack(codes[64:]), absmax[1:], CODE, 1, 128)
    expected = 4 * CODE.sum().item() * (2.0 + 4.0)  # each code 4 times per block
    assert abs(y1.item() - expected) <= FUSED_LINEAR[dtype] * 4 * CODE.abs().sum().item() * 6.0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 9, 32, 41])
# (4096, 128) and (64, 4096) take the AMX path for bf16 with M >= 2 where the CPU has AMX; other bf16 cases
# VDPBF16PS where the CPU has AVX512-BF16 (test_linear_4bit_decode.py also forces it off), every fp32 case the
# FMA path (K % 128 == 64 exercises its last half chunk).
@pytest.mark.parametrize("N, K", [(64, 4096), (4096, 128), (40, 4096), (37, 192), (5, 4160)])
@pytest.mark.parametrize("fmt", list(CODEBOOKS))
def test_linear_matches_torch_path(N, K, M, dtype, fmt):
    packed, absmax, W = random_4bit(N, K, seed=N + K + M, code=CODEBOOKS[fmt])
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    ref = F.linear(x, W.to(dtype))  # the torch path: weight rounded to the compute dtype, fp32 sums
    assert ref.abs().max() > 0
    y = LIB.linear_4bit(x, packed, absmax, CODEBOOKS[fmt], N, K)
    assert y.shape == (M, N) and y.dtype == dtype
    bound = FUSED_LINEAR[dtype] * (x.float().abs() @ W.abs().T)  # (M, N)
    err = (y.float() - ref.float()).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, where bound {bound[err > bound][0].item():.3g}"


@needs_kernels
def test_fp32_rows_do_not_depend_on_batch():
    # fp32 row m of a batched call is bit-identical to row m alone: batch composition never changes it.
    N, K, M = 32, 256, 13
    packed, absmax, _ = random_4bit(N, K, seed=1)
    x = torch.randn(2, M, K, generator=torch.Generator().manual_seed(2))
    y = LIB.linear_4bit(x, packed, absmax, CODE, N, K)
    assert y.shape == (2, M, N)
    alone = torch.stack([LIB.linear_4bit(x[b, m], packed, absmax, CODE, N, K) for b in range(2) for m in range(M)])
    assert torch.equal(y.reshape(-1, N), alone)


@needs_kernels
def test_linear_writes_into_out():
    N, K = 16, 256
    packed, absmax, W = random_4bit(N, K, seed=3)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    out = torch.full((2, N), float("nan"), dtype=torch.bfloat16)
    y = LIB.linear_4bit(x, packed, absmax, CODE, N, K, out=out)
    assert y.data_ptr() == out.data_ptr() and not out.isnan().any()


@needs_kernels
@pytest.mark.parametrize("N, K", [(64, 4096), (3, 192)])
@pytest.mark.parametrize("fmt", list(CODEBOOKS))
def test_dequantize_is_bit_identical(N, K, fmt):
    packed, absmax, W = random_4bit(N, K, seed=4, tiny_block=True, code=CODEBOOKS[fmt])
    out = LIB.dequantize_4bit_bf16(packed, absmax, CODEBOOKS[fmt], N, K)
    expected = W.to(torch.bfloat16)
    assert expected.view(-1)[128:192].abs().max() > 0  # the subnormal block is not flushed to zero
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@needs_kernels
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(K=96), "multiple of 64"),
        (dict(x_dtype=torch.float16), "bf16 or float32"),
        (dict(absmax_dtype=torch.bfloat16), "float32"),
        (dict(packed_bytes=-1), "uint8"),
        (dict(code=CODE[:15]), "16 float32 values"),
    ],
)
def test_bad_arguments_raise(change, match):
    N, K = 4, change.get("K", 128)
    packed = torch.zeros(N * K // 2 + change.get("packed_bytes", 0), dtype=torch.uint8)
    absmax = torch.ones(max(1, N * K // 64), dtype=change.get("absmax_dtype", torch.float32))
    x = torch.ones(1, K, dtype=change.get("x_dtype", torch.bfloat16))
    with pytest.raises(QuantizationError, match=match):
        LIB.linear_4bit(x, packed, absmax, change.get("code", CODE), N, K)


@pytest.fixture
def fresh_library():
    """compiled.library() decides once per process: forget that decision around the test."""
    compiled.library.cache_clear()
    yield compiled.library
    compiled.library.cache_clear()


def test_disable_env_turns_off_every_compiled_kernel(monkeypatch, fresh_library):
    monkeypatch.setenv("ADAPTERHUB_DISABLE_CPU_KERNELS", "1")
    assert fresh_library() is None  # the NF4 and the LoRA kernels: one library
    assert type(kernels._resolve.__wrapped__(torch.device("cpu"))) is Ops  # what ops_for would resolve to


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, fresh_library):
    if not _expected_available():
        pytest.skip("no build to break here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="torch path"):
        assert fresh_library() is None
    assert fresh_library() is None  # decided once: no second build, no second warning
    assert not any(Path(tmp_path, "adapterhub-kernels").iterdir())  # no partial library left behind


def test_build_is_cached_by_content_in_a_private_per_user_directory(monkeypatch, tmp_path):
    if not _expected_available():
        pytest.skip("no compiler here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "registry"))  # never where the kernels go
    first = build.build()
    assert first.parent == tmp_path / "cache" / "adapterhub-kernels" and first.exists()
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700 and not (tmp_path / "registry").exists()
    mtime = first.stat().st_mtime_ns
    assert build.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_cached_library_others_can_write_is_refused_not_loaded(monkeypatch, tmp_path, fresh_library):
    """Whoever can write the cache could run code in every process that loads it: refuse such a file."""
    if not _expected_available():
        pytest.skip("no compiler here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = build.build()
    library.chmod(0o757)  # world-writable
    with pytest.raises(build.BuildError, match="writable by nobody else"):
        build.build()
    with pytest.warns(UserWarning, match="torch path"):
        assert fresh_library() is None  # the process keeps the torch ops
    library.chmod(0o755)
    library.parent.chmod(0o777)
    with pytest.raises(build.BuildError, match="refusing .*adapterhub-kernels"):
        build.build()
    library.parent.chmod(0o700)
    if os.getuid() == 0:  # only root can hand a file to another user: a library someone else owns
        os.chown(library, 65534, 65534)
        with pytest.raises(build.BuildError, match="owned by uid 65534"):
            build.build()


# --- quantize, and dequantize with any blocksize: against the torch path ---------------------------


def edge_weight(n: int, G: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values in blocks of G: random, an all-zero block with a -0.0, a block of exact NF4 midpoints
    (ties go to the lower code; also in a short last block), a tiny block (absmax < 1e-38, the clamp)
    and a huge one (1e30)."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    blocks = [w[i : i + G] for i in range(0, n, G)]
    mids = torch.cat([torch.tensor([1.0, -1.0]), NF4.thresholds, -NF4.thresholds])
    if n % G:  # the short last block has its own code path in the kernel: ties there too
        blocks[-1].copy_(mids.repeat(G // mids.numel() + 1)[: n % G])
    if len(blocks) >= 5:
        blocks[0].zero_()
        blocks[0][1] = -0.0
        blocks[1].copy_(mids.repeat(G // mids.numel() + 1)[:G])
        blocks[2].mul_(1e-39 if dtype != torch.float16 else 1e-5)  # fp16: its subnormals
        blocks[3].mul_(1e30 if dtype != torch.float16 else 1e3)  # finite in the input dtype
    return w.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_kernel_encode_equals_torch_encode(blocksize, dtype):
    G = blocksize
    for k, n in enumerate([5 * G, 5 * G + 7, 6 * G + G - 1, 1, 3, G + 2, 7 * G + 1]):
        w = edge_weight(n, G, dtype, seed=G + k)
        packed, absmax = LIB.nf4_quantize(w, G)
        want_packed, want_absmax = blockwise.encode(Ops("cpu"), w, NF4, G)
        assert torch.equal(absmax, want_absmax), (n, G)
        assert torch.equal(packed, want_packed), (n, G)
        if n >= 5 * G:  # the edge blocks are there: zero block 0x77, ties lower, clamped tiny block
            assert absmax[0] == 0 and torch.all(packed[: G // 2] == 0x77)
            assert len(set(packed[G // 2 : G].tolist())) > 8
        if n % 2:
            assert packed[-1] & 15 == 7  # the padding element codes 0.0 (§1.4)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_quantize_and_dequantize_equal_torch_path(dtype, monkeypatch):
    cases = []
    for G in BLOCKSIZES:
        w = edge_weight(5 * G + 3 + G % 3, G, dtype, seed=G).view(-1, 1)
        cases.append((w, G, NF4Weight.quantize(w, blocksize=G)))
    fast = [(q, {t: q.dequantize(t) for t in DTYPES}) for _, _, q in cases]
    monkeypatch.setattr(kernels, "ops_for", lambda device: Ops(device))  # the torch path from here on
    for (w, G, _), (q, outs) in zip(cases, fast):
        slow = NF4Weight.quantize(w, blocksize=G)
        for key, value in slow.state_dict().items():
            assert torch.equal(q.state_dict()[key], value), (G, key)
        for t, out in outs.items():
            want = q.dequantize_into(torch.empty(q.shape, dtype=t), Ops("cpu"))
            assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), (G, t)  # the bits, NaN-free
    assert any(torch.isinf(outs[torch.float16]).any() for _, outs in fast) or dtype == torch.float16


@needs_kernels
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("fmt", list(CODEBOOKS))
def test_dequantize_blocks_is_bit_identical(blocksize, fmt):
    G, g, code = blocksize, torch.Generator().manual_seed(blocksize), CODEBOOKS[fmt]
    codes = torch.randint(0, 16, (3 * G,), generator=g, dtype=torch.uint8)
    absmax = torch.tensor([0.37, 2e-40, 1e5])  # a plain block, subnormal products, fp16 overflow to inf
    W = code[codes.long()] * absmax.repeat_interleave(G)  # fp32 products (semantics §1.5)
    for dtype in DTYPES:
        out = LIB.dequantize_4bit(pack(codes), absmax, code, G, torch.empty(3 * G, dtype=dtype))
        assert torch.equal(out.view(torch.uint8), W.to(dtype).view(torch.uint8)), dtype
    assert torch.isinf(W.to(torch.float16)).any() and W[G : 2 * G].abs().max() > 0


@needs_kernels
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: LIB.nf4_quantize(torch.ones(4, 64, dtype=torch.float64), 64), "float16 tensor"),
        (lambda: LIB.nf4_quantize(torch.ones(64, 4).t(), 64), "contiguous"),
        (lambda: LIB.nf4_quantize(torch.ones(0), 64), "non-empty"),
        (lambda: LIB.nf4_quantize(torch.ones(64), 48), "blocksize 48"),
        (lambda: LIB.dequantize_4bit(torch.zeros(48, dtype=torch.uint8), torch.ones(2), CODE, 64,
                                                   torch.empty(96)), "whole blocks"),
        (lambda: LIB.dequantize_4bit(torch.zeros(32, dtype=torch.uint8), torch.ones(2), CODE, 64,
                                                   torch.empty(128)), "packed must be"),
        (lambda: LIB.dequantize_4bit(torch.zeros(64, dtype=torch.uint8), torch.ones(2).double(), CODE, 64,
                                                   torch.empty(128)), "absmax_f32 must be"),
    ],
)
def test_bad_quantize_arguments_raise(call, match):
    with pytest.raises(QuantizationError, match=match):
        call()
