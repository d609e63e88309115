"""`CudaOps`: the torch ops, with the ``cuda/`` extension's kernels (``torch.ops.adapterhub``) on CUDA tensors.

``kernels.ops_for(device)`` returns a :class:`CudaOps` for a CUDA device when :func:`available` is True.
It sends the LoRA ops and NF4 dequantize / linear to the extension (the wrappers below: same names and
arguments as cuda/README.md's ops table) and everything else, and anything autograd must see, to the
torch ops it inherits (kernels/ops.py), which are also the reference ``tests/gpu`` compares against.

Build: on the first :func:`available` call on a machine where ``torch.cuda.is_available()``, the
sources in ``cuda/csrc`` are compiled with ``torch.utils.cpp_extension.load`` (nvcc, ninja; about a
minute, cached by torch under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
loaded into the process, which registers the ops. ``cuda/`` lies outside the Python package, so the
CUDA path needs a source checkout (or an install that ships ``cuda/csrc``); without the sources
:func:`available` warns once and returns False, and the torch path runs.

Without CUDA :func:`available` returns False at once, silently, and nothing is compiled.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from adapterhub.runtime.kernels.codebook import Codebook
from adapterhub.runtime.kernels.ops import Ops

_EXTENSION = "adapterhub_cuda"
# adapterhub/runtime/kernels/cuda.py -> the repository root holds cuda/csrc.
_CSRC = Path(__file__).resolve().parents[3] / "cuda" / "csrc"


class CudaOps(Ops):
    name = "cuda"

    def lora_shrink(self, x, A_stack, ids):
        if self.needs_grad(x, A_stack):
            return super().lora_shrink(x, A_stack, ids)
        return lora_shrink(x, A_stack, ids)

    def lora_expand(self, y, h, B_stack, ids, scaling, dora_scale=None):
        if self.needs_grad(y, h, B_stack, dora_scale):
            return super().lora_expand(y, h, B_stack, ids, scaling, dora_scale)
        return lora_expand(y, h, B_stack, ids, scaling, dora_scale)

    def dequantize_4bit(self, packed, absmax, codebook: Codebook, blocksize: int, out):
        if codebook.name != "nf4" or out.numel() % blocksize or out.numel() % 2 or self.needs_grad(absmax):
            return super().dequantize_4bit(packed, absmax, codebook, blocksize, out)
        return nf4_dequantize(packed, absmax, blocksize, out)

    def linear_4bit(self, x, packed, absmax, codebook: Codebook, blocksize: int, out_features: int, in_features: int):
        if codebook.name != "nf4" or self.needs_grad(x) or (out_features * in_features) % blocksize:
            return super().linear_4bit(x, packed, absmax, codebook, blocksize, out_features, in_features)
        return nf4_linear(x, packed, absmax, blocksize, out_features, in_features)


@functools.cache
def available() -> bool:
    """True when the CUDA ops are loaded (building them on the first call); False without CUDA."""
    return torch.cuda.is_available() and _load()


def sources() -> list[Path]:
    """The binding and every kernel: cuda/csrc/ops.cpp and cuda/csrc/*.cu (empty without a checkout)."""
    if not (_CSRC / "ops.cpp").is_file():
        return []
    return [_CSRC / "ops.cpp", *sorted(_CSRC.glob("*.cu"))]


def _load() -> bool:
    files = sources()
    if not files:
        warnings.warn(
            f"adapterhub: CUDA is available but the kernel sources are missing ({_CSRC}); "
            "using the torch path. Install adapterhub from a source checkout to build the CUDA ops.",
            stacklevel=3,
        )
        return False
    from torch.utils import cpp_extension  # setuptools and friends: only where CUDA is used

    try:
        cpp_extension.load(
            name=_EXTENSION,
            sources=[str(f) for f in files],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            extra_include_paths=[str(_CSRC)],
            is_python_module=False,  # the library registers torch.ops.adapterhub.* when loaded
        )
    except Exception as error:  # a failed build (no nvcc, no ninja, compiler error) must not stop serving
        warnings.warn(f"adapterhub: building the CUDA ops failed, using the torch path: {error}", stacklevel=3)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile / FakeTensor can trace through the ops."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"adapterhub::{name}", fake)


def _nf4_dequantize_fake(packed, absmax, blocksize, out):
    return None  # writes `out` only


def _nf4_gemv_fake(x, packed, absmax, blocksize, out_features):
    return x.new_empty((*x.shape[:-1], out_features))  # (..., Dout)


def _nf4_linear_fake(x, packed, absmax, blocksize, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))  # (..., Dout)


def _lora_shrink_fake(x, A_stack, ids):
    return x.new_empty((x.shape[0], x.shape[1], A_stack.shape[1]))  # (B, T, R)


def _lora_expand_fake(y, h, B_stack, ids, scaling, dora_scale):
    return None  # writes `y` only


FAKES = {
    "nf4_dequantize": _nf4_dequantize_fake,
    "nf4_gemv": _nf4_gemv_fake,
    "nf4_linear": _nf4_linear_fake,
    "lora_shrink": _lora_shrink_fake,
    "lora_expand": _lora_expand_fake,
}


# --- the ops (Semantics: kernels/ops.py; shapes and dtypes: cuda/README.md) ---------------------


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """h (B, T, R) = per row b, x[b] (T, Din) @ A_stack[ids[b]].T, fp32 accumulation, rounded to x.dtype."""
    return torch.ops.adapterhub.lora_shrink(x, A_stack, ids)


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    B_stack: torch.Tensor,
    ids: torch.Tensor,
    scaling: torch.Tensor,
    dora_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y (B, T, Dout) <- dora_scale[ids] * (y + scaling[ids] * h @ B_stack[ids]), in place; returns y."""
    torch.ops.adapterhub.lora_expand(y, h, B_stack, ids, scaling, dora_scale)
    return y


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """out <- CODE[q] * absmax[i // blocksize] in out.dtype (semantics §1.5), bit-exact; returns out."""
    torch.ops.adapterhub.nf4_dequantize(packed, absmax, blocksize, out)
    return out


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out_features: int, in_features: int
) -> torch.Tensor:
    """y (..., Dout) = x (..., Din) @ dequantize(W).T: the fused GEMV for up to 8 rows, else dequantize + GEMM."""
    return torch.ops.adapterhub.nf4_linear(x, packed, absmax, blocksize, out_features, in_features)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out_features: int):
    """nf4_linear through the fused GEMV at any row count (benchmarks; needs Din % 32 == 0, blocksize % 32 == 0)."""
    return torch.ops.adapterhub.nf4_gemv(x, packed, absmax, blocksize, out_features)
