"""The hot-path ops, resolved once per device: ``ops_for(device) -> Ops``.

- ``ops.py``       ``Ops``: every op in torch, with its ``Semantics:``; the twin the others are tested against
- ``cpu.py``       ``CpuOps``: the compiled CPU kernels (``compiled.py`` wraps them, ``build.py`` compiles
                   ``csrc/``) where they apply
- ``cuda.py``      ``CudaOps``: the ``cuda/`` extension's kernels on CUDA tensors
- ``codebook.py``, ``blockwise.py``: code tables and the blockwise encoder the quantize op runs
- ``tolerance.py`` how far each fast path may be from its twin

Capabilities are fields of the object (``fused_4bit_max_rows``, ``has_compiled_lora``), caches live on it
with bounded sizes, and the only process-wide state is this memo of one ``Ops`` per device (the
compiled library and the CUDA extension are loaded once per process, by ``compiled.library`` and
``cuda.available``). A new device is one subclass of ``Ops`` and one branch in ``_resolve``.
"""

from __future__ import annotations

import functools

import torch

from adapterhub.runtime.kernels import compiled, cuda
from adapterhub.runtime.kernels.codebook import Codebook
from adapterhub.runtime.kernels.cpu import CpuOps
from adapterhub.runtime.kernels.cuda import CudaOps
from adapterhub.runtime.kernels.ops import Ops

__all__ = ["Codebook", "CpuOps", "CudaOps", "Ops", "ops_for"]


def ops_for(device: torch.device | str) -> Ops:
    """The ops of `device` (one object per device for the life of the process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _resolve(device)


@functools.cache
def _resolve(device: torch.device) -> Ops:
    if device.type == "cpu":
        library = compiled.library()
        return CpuOps(device, library) if library is not None else Ops(device)
    if device.type == "cuda" and cuda.available():
        return CudaOps(device)
    return Ops(device)
