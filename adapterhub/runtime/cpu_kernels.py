"""Compiled CPU kernels: a fused NF4 linear for decode-sized inputs, NF4 quantize and dequantize, and the
batched LoRA shrink / expand in bf16 (every row reading its own adapter slot).

The C sources (``csrc/nf4_cpu.c``, ``csrc/lora_cpu.c``) are compiled into one library on first use with
the system C compiler (``cc -O3 -march=native -fopenmp -shared -fPIC``, about a second), cached under
``$ADAPTERHUB_HOME/kernels/`` (else ``~/.cache/adapterhub/kernels/``) by a hash of the source, the
flags, the compiler and the CPU's feature flags, and loaded with ctypes (which releases the GIL during
the call). There is no torch C++ extension, so nothing needs ninja or the torch headers at run time.
The library links ``libgomp.so.1``; torch's wheel ships a library of that soname, already loaded by
``import torch``, so the kernels share torch's OpenMP thread pool and thread count.

If there is no compiler, the build fails or the machine is not Linux/x86-64 with AVX-512,
:func:`available` returns False after one warning and callers keep their torch path. Set
``ADAPTERHUB_DISABLE_CPU_KERNELS=1`` to force the torch path.

NF4 linear: the weight is exactly the torch path's, ``W = fp32(code * absmax)``, rounded to bf16 when x is bf16
(SEMANTICS §1.5); only the order of the fp32 sums differs from ``dequantize`` then ``F.linear``. Paths:
fp32 x, or bf16 x with 1 row: AVX-512 FMAs over a 16-entry per-block table (vpermps lookup);
bf16 x with 2 or more rows (N % 32 == 0, K % 128 == 0) on CPUs with AMX: the weight decoded to bf16
tiles and multiplied by AMX, 32 rows of x per pass over W. fp32 results do not depend on the batch; a
bf16 row may differ by one bf16 rounding between the two paths. Bound checked by the tests,
:data:`TOLERANCE`: ``|y - y_torch| <= TOLERANCE[dtype] * (|x| @ |W|^T)``.

LoRA shrink / expand (bf16, AVX-512 BW): runtime/kernels.py's Semantics up to the order of the fp32 sums,
within one bf16 ulp of the exact result (tests/runtime/test_cpu_lora_kernels.py). Decode (T < 16 tokens per
row) streams each row's slot once with AVX512-BF16 dot products; prefill (T >= 16) lays each row's slot
out in bf16 pairs once and multiplies with AMX tiles, or without AMX with VDPBF16PS register tiles.
Where the CPU has AVX512-BF16, bf16 subnormal inputs read as zero (the instructions' rule).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from adapterhub.errors import KernelArgumentError, QuantizationError

G = 64  # NF4 quant block size the kernels support (SEMANTICS §1.3)
# Largest row count (M = B*T) for which the fused linear beats dequantize-into-bf16 + F.linear for bf16
# (bench/nf4_linear.py, 2-core AVX512-BF16 + AMX machine): 32 rows share one AMX pass over the weight;
# without AMX the FMA path only wins for 1-2 rows. Raised to _AMX_MAX_ROWS when the library loads with
# AMX; callers read it at each call.
FUSED_MAX_ROWS = 2
_AMX_MAX_ROWS = 32
# Per compute dtype: |nf4_linear(x) - F.linear(x, W)| <= TOLERANCE[dtype] * (|x| @ |W|^T) elementwise:
# fp32 sums in another order, and for bf16 one output rounding either way (2^-8 relative).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8}

_SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("nf4_cpu.c", "lora_cpu.c"))
_HEADERS = (Path(__file__).parent / "csrc" / "cpu_common.h",)  # part of the cache key, not compiled alone
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_DISABLE_ENV = "ADAPTERHUB_DISABLE_CPU_KERNELS"
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {  # name: (argument types, return type)
    "nf4_linear": ((_P, ctypes.c_int, _I, _I, _I, _P, _P, _P), None),  # x, is_bf16, M, N, K, packed, absmax, y
    "nf4_dequantize_bf16": ((_P, _P, _I, _P), None),  # packed, absmax, n, out
    "nf4_amx_enable": ((), ctypes.c_int),
    "nf4_quantize": ((_P, ctypes.c_int, _I, _I, _P, _P), None),  # x, kind, n, blocksize, absmax, packed
    "nf4_dequantize": ((_P, _P, _I, _I, ctypes.c_int, _P), None),  # packed, absmax, n, blocksize, kind, out
    "lora_kernels_available": ((), ctypes.c_int),
    "lora_amx_enable": ((), ctypes.c_int),
}
_LORA_SIGNATURES = {  # only where lora_kernels_available() (AVX-512 BW)
    "lora_shrink_bf16": ((_P, _P, _P, _I, _I, _I, _I, _P), None),  # x, A, ids, B, T, R, Din, h
    "lora_expand_bf16": ((_P, _P, _P, _P, _P, _P, _I, _I, _I, _I), None),  # y, h, BT, ids, scaling, dora, B, T, R, Dout
}
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C functions' dtype codes
QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # SEMANTICS §1.3

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the CDLL, or None after a failure


def available() -> bool:
    """True when the compiled kernels are loaded (building them on the first call)."""
    return _library() is not None


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax_f32: torch.Tensor,
    out_features: int,
    in_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused NF4 linear without bias, for few rows (decode); see :data:`FUSED_MAX_ROWS`.

    Semantics: ``y = (x.float() @ dequantize(packed, absmax_f32).reshape(N, K).to(x.dtype).float().T).to(x.dtype)``
    up to the order of the fp32 sums (:data:`TOLERANCE`).

    x (..., K) bf16 or fp32, contiguous; packed uint8 with N*K/2 bytes (any shape, e.g. bnb's
    (N*K/2, 1)): the row-major (N, K) weight, element 2k in the high nibble (SEMANTICS §1.4);
    absmax_f32 (N*K/G,) float32 per block of G = 64, double quant already decoded; K % 64 == 0.
    Returns y (..., N) in x's dtype (written into ``out`` when given).
    """
    lib = _require()
    N, K = out_features, in_features
    _check_weight(packed, absmax_f32, N, K)
    if x.dtype not in (torch.bfloat16, torch.float32) or x.device.type != "cpu" or x.shape[-1] != K:
        raise QuantizationError(
            f"nf4_linear needs a CPU bf16 or float32 x with last dim in_features={K}, got "
            f"{tuple(x.shape)} {x.dtype} on {x.device}; convert x or use the torch path"
        )
    x = x.contiguous()
    M = x.numel() // K
    y = _output(out, (*x.shape[:-1], N), x.dtype, "y")
    is_bf16 = x.dtype == torch.bfloat16
    lib.nf4_linear(x.data_ptr(), is_bf16, M, N, K, packed.data_ptr(), absmax_f32.data_ptr(), y.data_ptr())
    return y


def nf4_dequantize(
    packed: torch.Tensor,
    absmax_f32: torch.Tensor,
    out_features: int,
    in_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize an NF4 weight into bf16, bit-identical to the torch path (SEMANTICS §1.5).

    Semantics: ``W[i] = bf16(code[q_i] * absmax_f32[i // 64])`` with the product in fp32.
    packed, absmax_f32 as in :func:`nf4_linear`. Returns W (N, K) bf16 (into ``out`` when given).
    """
    lib = _require()
    N, K = out_features, in_features
    _check_weight(packed, absmax_f32, N, K)
    w = _output(out, (N, K), torch.bfloat16, "W")
    lib.nf4_dequantize_bf16(packed.data_ptr(), absmax_f32.data_ptr(), N * K, w.data_ptr())
    return w


def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 codes of x, bit-identical to runtime.nf4's torch path (SEMANTICS §1.2-1.4).

    x: contiguous CPU float32 / bf16 / fp16, any shape, n elements, read row-major; a short last block
    is zero-padded. Returns (packed uint8 (ceil(n/2),), element 2k in the high nibble, odd n ending in
    nibble 7; absmax float32 (ceil(n/G),)), where s = x * fp32(1 / max(absmax, 1e-38)) picks the code.
    """
    lib = _require()
    if (
        not isinstance(x, torch.Tensor)
        or x.dtype not in _KINDS
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or x.numel() == 0
    ):
        got = (tuple(x.shape), x.dtype, x.device, x.is_contiguous()) if isinstance(x, torch.Tensor) else type(x)
        raise QuantizationError(
            f"nf4_quantize needs a non-empty contiguous CPU float32 / bfloat16 / float16 tensor, got "
            f"(shape, dtype, device, contiguous)={got}; call .contiguous() or use runtime.nf4.quantize"
        )
    _check_blocksize(blocksize)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.nf4_quantize(x.data_ptr(), _KINDS[x.dtype], n, blocksize, absmax.data_ptr(), packed.data_ptr())
    return packed, absmax


def nf4_dequantize_blocks(
    packed: torch.Tensor, absmax_f32: torch.Tensor, blocksize: int, out: torch.Tensor
) -> torch.Tensor:
    """Whole blocks of an NF4 weight into out, bit-identical to runtime.nf4's torch path (SEMANTICS §1.5).

    Semantics: ``out[i] = dtype(fp32(code[q_i] * absmax_f32[i // G]))``, round to nearest even.
    out: contiguous CPU float32 / bf16 / fp16 of n elements, n % blocksize == 0; packed: contiguous
    uint8 of n/2 bytes (any shape); absmax_f32: contiguous float32 of n/G values. Returns out.
    """
    lib = _require()
    _check_blocksize(blocksize)
    if out.dtype not in _KINDS or out.device.type != "cpu" or not out.is_contiguous() or out.numel() % blocksize:
        raise QuantizationError(
            f"out must be a contiguous CPU float32 / bfloat16 / float16 tensor of whole blocks of {blocksize}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()}); "
            "dequantize a short last block with runtime.nf4"
        )
    n = out.numel()
    inputs = ((packed, torch.uint8, n // 2, "packed"), (absmax_f32, torch.float32, n // blocksize, "absmax_f32"))
    for t, dtype, count, name in inputs:
        if t.dtype != dtype or t.numel() != count or not t.is_contiguous() or t.device.type != "cpu":
            raise QuantizationError(
                f"{name} must be a contiguous CPU {dtype} tensor of {count} values for {n} elements in blocks "
                f"of {blocksize}, got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous={t.is_contiguous()})"
            )
    lib.nf4_dequantize(packed.data_ptr(), absmax_f32.data_ptr(), n, blocksize, _KINDS[out.dtype], out.data_ptr())
    return out


def lora_available() -> bool:
    """True when the compiled LoRA kernels are loaded (AVX-512 BW; the NF4 kernels need only AVX-512 F)."""
    return _library() is not None and _state.get("lora", False)


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, ids: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """kernels.lora_shrink for bf16 on the CPU: each row reads its own slot of the stack, once.

    x (B, T, Din) bf16, A_stack (N, R, Din) bf16, both contiguous; ids (B,) int64 in [0, N). Dtypes,
    devices, layout and shapes are checked unless ``check=False`` (runtime.kernels passes it: the pool
    builds the stacks contiguous in the compute dtype, and the checks cost ~1 us per tensor, a few
    percent of a decode step). The range of ids is always trusted (the pool maps adapters to slots).
    Returns h (B, T, R) bf16; fp32 sums in another order than torch's.
    """
    lib = _require_lora()
    Bsz, T, Din = x.shape
    R = A_stack.shape[1]
    if check:
        _check_lora("lora_shrink", ids, Bsz, x=(x, (Bsz, T, Din)), A_stack=(A_stack, (A_stack.shape[0], R, Din)))
    h = torch.empty(Bsz, T, R, dtype=torch.bfloat16)
    lib.lora_shrink_bf16(x.data_ptr(), A_stack.data_ptr(), ids.data_ptr(), Bsz, T, R, Din, h.data_ptr())
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    B_stack: torch.Tensor,
    ids: torch.Tensor,
    scaling: torch.Tensor,
    dora_scale: torch.Tensor | None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """kernels.lora_expand for bf16 on the CPU, in place, with its Semantics' exact roundings (the DoRA
    scale is applied in fp32, then rounded once).

    y (B, T, Dout) bf16, h (B, T, R) bf16, B_stack (N, R, Dout) bf16, scaling (N,) fp32, dora_scale
    (N, Dout) fp32 or None, all contiguous; ids (B,) int64 in [0, N); checked as in :func:`lora_shrink`.
    Returns y.
    """
    lib = _require_lora()
    Bsz, T, Dout = y.shape
    N, R = B_stack.shape[0], h.shape[-1]
    if check:
        tensors = {"y": (y, (Bsz, T, Dout)), "h": (h, (Bsz, T, R)), "B_stack": (B_stack, (N, R, Dout)),
                   "scaling": (scaling, (N,))}
        if dora_scale is not None:
            tensors["dora_scale"] = (dora_scale, (N, Dout))
        _check_lora("lora_expand", ids, Bsz, **tensors)
    dora = None if dora_scale is None else dora_scale.data_ptr()
    lib.lora_expand_bf16(y.data_ptr(), h.data_ptr(), B_stack.data_ptr(), ids.data_ptr(), scaling.data_ptr(), dora,
                         Bsz, T, R, Dout)
    return y


# --- validation ---------------------------------------------------------------------------------


def _check_weight(packed: torch.Tensor, absmax: torch.Tensor, N: int, K: int) -> None:
    if K <= 0 or N <= 0 or K % G:
        raise QuantizationError(
            f"the CPU NF4 kernels need in_features a positive multiple of {G}, got (out_features, "
            f"in_features)=({N}, {K}); use the torch dequantize path for this layer"
        )
    if packed.dtype != torch.uint8 or packed.numel() != N * K // 2 or not packed.is_contiguous():
        raise QuantizationError(
            f"packed NF4 weight must be a contiguous uint8 tensor of N*K/2={N * K // 2} bytes for "
            f"(N, K)=({N}, {K}), got {tuple(packed.shape)} {packed.dtype} (contiguous={packed.is_contiguous()})"
        )
    if absmax.dtype != torch.float32 or absmax.numel() != N * K // G or not absmax.is_contiguous():
        raise QuantizationError(
            f"absmax must be a contiguous float32 tensor of N*K/{G}={N * K // G} values (double quant "
            f"decoded), got {tuple(absmax.shape)} {absmax.dtype}; decode it with runtime.nf4 first"
        )
    if packed.device.type != "cpu" or absmax.device.type != "cpu":
        raise QuantizationError(f"the CPU NF4 kernels need CPU tensors, got {packed.device} / {absmax.device}")


_LORA_DTYPES = {"scaling": torch.float32, "dora_scale": torch.float32}  # every other tensor: bf16


def _check_lora(op: str, ids: torch.Tensor, rows: int, **tensors: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Each name=(tensor, expected shape) is a contiguous CPU tensor of that shape and its dtype; ids (rows,) int64."""
    for name, (t, shape) in tensors.items():
        dtype = _LORA_DTYPES.get(name, torch.bfloat16)
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
            raise KernelArgumentError(
                f"{op}: {name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {tuple(t.shape)} "
                f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()}); use runtime.kernels.{op}, which "
                "takes any dtype"
            )
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous() or tuple(ids.shape) != (rows,):
        raise KernelArgumentError(f"{op}: ids must be a contiguous CPU int64 tensor of shape ({rows},), got "
                         f"{tuple(ids.shape)} {ids.dtype} on {ids.device}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in QUANT_BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize} is not one of {QUANT_BLOCKSIZES} (SEMANTICS §1.3)")


def _output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise QuantizationError(
            f"out for {name} must be a contiguous CPU {dtype} tensor of shape {shape}, "
            f"got {tuple(out.shape)} {out.dtype} (contiguous={out.is_contiguous()}) on {out.device}"
        )
    return out


# --- build, cache, load -------------------------------------------------------------------------


def _require():
    lib = _library()
    if lib is None:
        raise RuntimeError(
            "the compiled CPU NF4 kernels are not available (see the earlier warning); check "
            "cpu_kernels.available() and use the torch path"
        )
    return lib


def _require_lora():
    if not lora_available():
        raise RuntimeError(
            "the compiled CPU LoRA kernels are not available (no AVX-512 BW, or the build failed: see the "
            "earlier warning); check cpu_kernels.lora_available() and use runtime.kernels' torch path"
        )
    return _state["lib"]


def _library():
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def _load():
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"adapterhub: CPU NF4 kernels unavailable, using the torch path ({exc})", stacklevel=3)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _state["lora"] = bool(lib.lora_kernels_available())
    _state["lora_amx"] = bool(lib.lora_amx_enable())
    for name, (argtypes, restype) in _LORA_SIGNATURES.items() if _state["lora"] else ():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    if lib.nf4_amx_enable():  # AMX tiles for bf16 with 2..32 rows where the CPU and the kernel allow them
        global FUSED_MAX_ROWS
        FUSED_MAX_ROWS = _AMX_MAX_ROWS
    return lib


def _build() -> Path:
    """Compile the source once per (source, flags, compiler, CPU) into the cache; returns the .so path."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"no CPU kernels for {platform.system()}/{platform.machine()}")
    if "avx512f" not in _cpu_flags():
        raise RuntimeError("the CPU has no AVX-512")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    source = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version, _cpu_flags().encode()]))
    cache = _cache_dir()
    target = cache / f"nf4_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a unique temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".nf4_cpu-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cache_dir() -> Path:
    home = os.environ.get("ADAPTERHUB_HOME")
    return Path(home) / "kernels" if home else Path.home() / ".cache" / "adapterhub" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
