"""The decode step of a whole stack of decoder layers as one compiled call (csrc/decode_layer.c), LoRA included.

The per-op decode step (model/layers.py `decode`) makes ~11 Python dispatches and ~30 ctypes calls per layer,
each ~5-9 us of fixed cost, for linears whose work is a few us (135M model: 210 linears per step). Here the
model (model/decode_stack.py) describes every layer once, as the ctypes Structures below holding the pointers
of its weights, norms and adapter stacks, and a step is one call: `DecodeStackKernel.run(stack, step)`.

The Structures mirror csrc/decode_layer.c's structs field for field (keep the order). What the step computes,
rounding for rounding, is in that file's header: the per-op step's C functions in the same order, so bf16
results with 4-bit weights are bit-identical to it; dense weights go through a GEMV that sums in another order
than torch's GEMM. Nothing here checks: a stale pointer is a use-after-free, which is why the model rebuilds
the descriptors whenever an adapter stack or weight changes (AdapterLinear.generation).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from adapterhub.runtime.kernels import compiled

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class LoraGroup(ctypes.Structure):
    _fields_ = [("A", _P), ("BT", _P), ("scaling", _P), ("dora", _P), ("slot_map", _P), ("R", _I)]


class LinearDesc(ctypes.Structure):
    _fields_ = [("N", _I), ("K", _I), ("W", _P), ("packed", _P), ("absmax", _P), ("code", _P), ("bias", _P),
                ("has_dora", _I), ("ngroups", _I), ("groups", ctypes.POINTER(LoraGroup))]


class LayerDesc(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("qkv", LinearDesc * 3), ("o", LinearDesc),
                ("gate_up", LinearDesc * 2), ("down", LinearDesc), ("is_fused_qkv", _I), ("is_fused_gate_up", _I),
                ("window", _I)]


class StackDesc(ctypes.Structure):
    _fields_ = [("L", _I), ("D", _I), ("H", _I), ("Hkv", _I), ("Dh", _I), ("F", _I), ("eps", _F), ("scale", _F),
                ("is_offset_norm", _I), ("is_bf16", _I), ("max_rank", _I), ("layers", ctypes.POINTER(LayerDesc))]


class StepDesc(ctypes.Structure):
    _fields_ = [("x", _P), ("B", _I), ("ids", _P), ("cos", _P), ("sin", _P), ("kc", _P), ("vc", _P),
                ("nblocks", _I), ("bs", _I), ("pos", _P), ("tables", _P), ("nt", _I), ("span", _I), ("scratch", _P)]


@functools.cache
def kernel() -> DecodeStackKernel | None:
    """The process's whole-step decode kernel, or None where the compiled library does not run it."""
    library = compiled.library()
    if library is None or not library.has_lora:
        return None
    lib = library.lib
    lib.decode_stack_available.argtypes, lib.decode_stack_available.restype = (), ctypes.c_int
    if not lib.decode_stack_available():
        return None
    lib.decode_stack.argtypes, lib.decode_stack.restype = (ctypes.POINTER(StackDesc), ctypes.POINTER(StepDesc)), None
    lib.decode_stack_scratch_bytes.argtypes = (ctypes.POINTER(StackDesc), _I)
    lib.decode_stack_scratch_bytes.restype = _I
    return DecodeStackKernel(lib, {True: library.fused_max_rows, False: library.fused_max_rows_fp32})


@dataclass(frozen=True, eq=False)
class DecodeStackKernel:
    lib: ctypes.CDLL
    max_rows: dict[bool, int]  # is_bf16 -> rows up to which the per-op step runs the fused 4-bit kernel too

    def scratch_bytes(self, stack: StackDesc, rows: int) -> int:
        return self.lib.decode_stack_scratch_bytes(ctypes.byref(stack), rows)

    def run(self, stack: StackDesc, step: StepDesc) -> None:
        """Every layer of `stack` for the rows of `step`; step.x is updated in place to the last layer's output."""
        self.lib.decode_stack(ctypes.byref(stack), ctypes.byref(step))
