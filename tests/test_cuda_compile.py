"""CI checks of cuda/ that need no GPU.

1. ``cuda/compile_check.sh``: every ``.cu`` compiles with nvcc for sm_90 and ``ops.cpp`` passes g++
   against torch's headers (skipped without nvcc; in CI with nvcc it must pass).
2. The kernels themselves, run on the CPU: ``cuda/csrc/*.cu`` built with g++ and
   ``cuda/emulator/host_shim.h`` (threads as fibers), called through their raw-pointer launchers and
   compared with the torch twins (``runtime/kernels/ops.py``) under ``kernels/tolerance.py``. This checks
   indexing, nibble order, reductions and roundings, not speed or the GPU memory model
   (``tests/gpu`` does that on a GPU).
3. ``runtime/kernels/cuda.py``: quiet without CUDA, and its fake implementations agree with the schemas of
   ``ops.cpp`` (``torch.library.opcheck`` against CPU implementations that call the twins).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adapterhub.runtime.kernels import cuda as cuda_ops
from adapterhub.runtime.kernels.tolerance import IMPLEMENTATIONS
from tests.cuda_semantics import twin, dequantize_semantics, expand_semantics

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "cuda"
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # AdapterhubDType, launchers.h
DTYPES = list(DTYPE_CODES)


@pytest.mark.skipif(not os.access(NVCC, os.X_OK), reason=f"no nvcc ({NVCC})")
def test_compile_check_compiles_every_cuda_source():
    run = subprocess.run(["bash", str(CUDA_DIR / "compile_check.sh")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    checked = set(re.findall(r"ok  .* (\w+\.(?:cu|cpp))", run.stdout))
    expected = {p.name for p in (CUDA_DIR / "csrc").glob("*.cu")} | {"ops.cpp"}
    assert checked == expected, run.stdout


# --- the kernels, emulated on the CPU ----------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The launchers of cuda/csrc/*.cu compiled for the host (g++ + host_shim.h), via ctypes."""
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").is_file():
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) to emulate the kernels")
    library = tmp_path_factory.mktemp("emulated") / "libadapterhub_emulated.so"
    sources = sorted(str(p) for p in (CUDA_DIR / "csrc").glob("*.cu"))
    command = ["g++", "-x", "c++", "-std=c++17", "-O1", "-shared", "-fPIC", "-include",
               str(CUDA_DIR / "emulator" / "host_shim.h"), f"-I{CUDA_INCLUDE}", *sources, "-o", str(library)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return ctypes.CDLL(str(library))


def _args(*values):
    """ctypes arguments: tensors by data pointer (None = null), ints as int64, dtypes as AdapterhubDType."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(ctypes.c_void_p(v.data_ptr()))
        elif isinstance(v, torch.dtype):
            out.append(ctypes.c_int32(DTYPE_CODES[v]))
        elif v is None:
            out.append(ctypes.c_void_p(0))
        else:
            out.append(ctypes.c_int64(v))
    return [*out, ctypes.c_void_p(0)]  # the stream


def _assert_close(actual, expected, dtype):
    atol, rtol = IMPLEMENTATIONS[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _random_nf4(numel, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-numel // blocksize), generator=g) * 3 + 0.01
    return packed, absmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel, blocksize", [(48 * 64, 64), (6 * 96, 32), (3 * 256, 256), (86, 16), (5 * 48, 16)])
def test_emulated_nf4_dequantize_is_bit_exact(emulated, dtype, numel, blocksize):
    # (86, 16): numel % 16 != 0, the scalar tail.
    packed, absmax = _random_nf4(numel, blocksize, seed=numel)
    out = torch.full((numel,), float("nan"), dtype=dtype)
    emulated.launch_nf4_dequantize(*_args(packed, absmax, numel, blocksize, out, dtype))
    expected = dequantize_semantics(packed, absmax, blocksize, numel).to(dtype)  # one RNE rounding
    assert expected.abs().max() > 0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_emulated_nf4_gemv_matches_linear_semantics(emulated, dtype, rows):
    # Semantics of Ops.linear_4bit: y = (x.float() @ W.float().T).to(x.dtype), W dequantized to x.dtype.
    N, K, blocksize = 12, 1088, 128  # 34 chunks: lanes 0, 1 take two steps; blocks span rows (1088 % 128 != 0)
    packed, absmax = _random_nf4(N * K, blocksize, seed=rows)
    absmax /= 8
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = torch.empty(rows, N, dtype=dtype)
    emulated.launch_nf4_gemv(*_args(x, packed, absmax, rows, N, K, blocksize, y, dtype))
    W = dequantize_semantics(packed, absmax, blocksize, N * K).to(dtype).view(N, K)
    expected = (x.float() @ W.float().T).to(dtype)
    assert expected.abs().max() > 0.5
    _assert_close(y, expected, dtype)


def _adapter_stacks(N, R, Din, Dout, dtype, seed):
    """A (N, R, Din), B (N, R, Dout) with slot 0 = no adapter (zeros), scaling (N,), dora_scale (N, Dout)."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(N, R, Din, generator=g) / Din**0.5).to(dtype)
    B = (torch.randn(N, R, Dout, generator=g) / R**0.5).to(dtype)
    A[0], B[0] = 0, 0
    scaling = torch.rand(N, generator=g) + 0.5
    dora = torch.rand(N, Dout, generator=g) + 0.5
    dora[0] = 1
    return A, B, scaling, dora


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R, Din", [(8, 256), (10, 136), (16, 64)])  # R = 10: a partial rank tile
def test_emulated_lora_shrink_matches_twin(emulated, dtype, R, Din):
    Bsz, T, N = 3, 2, 4
    A, _, _, _ = _adapter_stacks(N, R, Din, 8, dtype, seed=R)
    x = torch.randn(Bsz, T, Din, generator=torch.Generator().manual_seed(7)).to(dtype)
    ids = torch.tensor([2, 0, 3])
    h = torch.full((Bsz, T, R), float("nan"), dtype=dtype)
    emulated.launch_lora_shrink(*_args(x, A, ids, Bsz * T, T, Din, R, h, dtype))
    expected = twin.lora_shrink(x, A, ids)
    assert expected[0].abs().max() > 0.1  # a row with an adapter
    assert torch.all(expected[1] == 0)  # slot 0
    _assert_close(h, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Dout", [64, 70])  # 70: not a multiple of the vector width (scalar path)
@pytest.mark.parametrize("is_dora", [False, True])
def test_emulated_lora_expand_matches_twin(emulated, dtype, Dout, is_dora):
    Bsz, T, N, R = 3, 2, 4, 8
    _, B, scaling, dora = _adapter_stacks(N, R, 16, Dout, dtype, seed=Dout)
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(Bsz, T, Dout, generator=g).to(dtype)
    h = torch.randn(Bsz, T, R, generator=g).to(dtype)
    ids = torch.tensor([1, 0, 3])
    dora_scale = dora if is_dora else None
    y = y0.clone()
    emulated.launch_lora_expand(*_args(y, h, B, ids, scaling, dora_scale, Bsz * T, T, Dout, R, dtype))
    expected = twin.lora_expand(y0.clone(), h, B, ids, scaling, dora_scale)
    assert not torch.equal(expected[0], y0[0])  # the adapter changes its row
    assert torch.equal(expected[1], y0[1])  # slot 0 leaves its row alone
    _assert_close(y, expected, dtype)
    if dtype != torch.float32:  # in fp32 the summation order alone flips last bits
        # The kernel mirrors every rounding of the Semantics; only the order of the R fp32 products differs.
        assert (y == expand_semantics(y0, h, B, ids, scaling, dora_scale)).float().mean() > 0.95


# --- runtime/kernels/cuda.py without CUDA ------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_ops_unavailable_quietly_without_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_ops.available() is False
    assert [p.name for p in cuda_ops.sources()][0] == "ops.cpp"


def test_cpu_forward_never_loads_the_cuda_extension():
    """A CPU forward never asks for the CUDA extension (checked in a fresh interpreter): ops_for('cpu') resolves
    without it, and nothing is built or registered under torch.ops.adapterhub."""
    code = (
        "import torch\n"
        "from adapterhub.runtime import load_base\n"
        "from adapterhub.runtime.kernels import cuda, ops_for\n"
        "base = load_base('tiny', compute_dtype=torch.float32)\n"
        "assert base(torch.tensor([[256, 72, 105]])).abs().max() > 0\n"
        "assert ops_for('cpu').name != 'cuda'\n"
        "loaded = cuda.available.cache_info().currsize or hasattr(torch.ops.adapterhub, 'lora_shrink')\n"
        "print('cuda touched' if loaded else 'clean')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "clean"


@pytest.fixture(scope="module")
def schemas_on_cpu():
    """The ops.cpp schemas defined from Python, with CPU implementations: the LoRA twins, the NF4 spec."""
    if torch.cuda.is_available() or hasattr(torch.ops.adapterhub, "lora_shrink"):
        pytest.skip("the real adapterhub ops are (or may be) loaded in this process")
    text = (CUDA_DIR / "csrc" / "ops.cpp").read_text()
    schemas = re.findall(r'm\.def\("([^"]+)"\)', text)
    assert {s.split("(")[0] for s in schemas} == set(cuda_ops.FAKES)
    library = torch.library.Library("adapterhub", "DEF")
    for schema in schemas:
        library.define(schema)

    def lora_expand_cpu(y, h, B_stack, ids, scaling, dora_scale):
        twin.lora_expand(y, h, B_stack, ids, scaling, dora_scale)

    def nf4_dequantize_cpu(packed, absmax, blocksize, out):
        out.copy_(dequantize_semantics(packed.view(-1), absmax, blocksize, out.numel()).view_as(out))

    def nf4_linear_cpu(x, packed, absmax, blocksize, out_features, in_features):
        W = dequantize_semantics(packed.view(-1), absmax, blocksize, out_features * in_features)
        return torch.nn.functional.linear(x, W.to(x.dtype).view(out_features, in_features))

    library.impl("lora_shrink", twin.lora_shrink, "CPU")
    library.impl("lora_expand", lora_expand_cpu, "CPU")
    library.impl("nf4_dequantize", nf4_dequantize_cpu, "CPU")
    library.impl("nf4_linear", nf4_linear_cpu, "CPU")
    library.impl("nf4_gemv", lambda x, p, a, g, n: nf4_linear_cpu(x, p, a, g, n, x.shape[-1]), "CPU")
    cuda_ops._register_fakes()
    yield torch.ops.adapterhub
    library._destroy()


def test_fakes_agree_with_the_schemas(schemas_on_cpu):
    A, B, scaling, dora = _adapter_stacks(3, 8, 64, 32, torch.float32, seed=0)
    x = torch.randn(2, 3, 64)
    ids = torch.tensor([2, 1])
    h = schemas_on_cpu.lora_shrink(x, A, ids)
    assert h.shape == (2, 3, 8) and h.abs().max() > 0
    packed, absmax = _random_nf4(32 * 64, 64, seed=0)
    cases = {
        "lora_shrink": (x, A, ids),
        "lora_expand": (torch.randn(2, 3, 32), h, B, ids, scaling, dora),
        "nf4_dequantize": (packed, absmax, 64, torch.empty(32, 64)),
        "nf4_linear": (torch.randn(2, 64), packed, absmax, 64, 32, 64),
        "nf4_gemv": (torch.randn(2, 1, 64), packed, absmax, 64, 32),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(schemas_on_cpu, name).default, args,
                              test_utils=("test_schema", "test_faketensor"))
