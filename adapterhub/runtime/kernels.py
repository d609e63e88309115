"""The runtime's hot-path ops as torch functions: the CPU path, and the reference the CUDA kernels match.

Each op states what it computes in a ``Semantics:`` block (torch notation, per row) with the shape and
dtype of every argument. On CUDA tensors an op dispatches to ``cuda_ops.<op>`` (same name, same
arguments in the same order) when ``cuda_ops.available()``; ``tests/gpu`` compares the two with
:data:`TOLERANCE`. On CPU, bf16 LoRA ops go to the compiled kernels (``cpu_kernels.lora_shrink`` /
``lora_expand``, csrc/lora_cpu.c: each row streams its own slot; AMX or VDPBF16PS tiles for prefill), which follow
the Semantics up to the order of fp32 sums and make a row's result independent of the batch. Other
dtypes, or a CPU without the kernels, pick between two equivalent torch formulations by the shape and
by how many distinct slots the batch uses (ids is a small host tensor there; the CUDA path never looks
at the values of ids, so it has no host sync). No formulation branches per row.

Vocabulary: B rows, T tokens per row, Din / Dout features, N adapter slots, R rank (runtime/linear.py
keeps one stack per rank; a slot of lower rank in a stack would be zero-padded, which changes no
result), G quant block size.
Adapter stacks: ``A_stack (N, R, Din)`` is lora_A per slot, ``B_stack (N, R, Dout)``
is lora_B **transposed** per slot (``B_stack[n] = lora_B[n].T``: each slot's rank rows are contiguous,
so all slots together form one ``(N*R, Dout)`` matrix). Slot 0 is "no adapter": zero A and B,
``dora_scale`` 1.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from adapterhub.runtime import cpu_kernels

# |y_cuda - y_cpu| <= atol + rtol * |y_cpu| per dtype, for tests comparing implementations of one op.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

# Without the compiled kernels (fp32 / fp16, or no AVX-512), the CPU LoRA ops compute every slot for
# every row (one GEMM over the (N*R, D) stack, then a select) while rows x slots stays below this
# (slots: the whole stack, or only those the batch uses when that is under half of it); otherwise they
# gather each row's A / B and use bmm. Measured with bench/mixed_batch.py (D 1024-2816, R 16): the
# all-slots form wins at decode (it reads each adapter once, no per-row copies), the gathered form at
# prefill (T = 64) with many distinct adapters.
DENSE_MAX_ROWS_X_SLOTS = 8192

_cuda_state: dict[str, object] = {}
_scratch = threading.local()
_plans: dict = {}


def _cuda_ops(t: torch.Tensor):
    """The cuda_ops module when t is a CUDA tensor and the extension loaded, else None."""
    if t.device.type != "cuda":
        return None
    if "ops" not in _cuda_state:
        try:
            from adapterhub.runtime import cuda_ops
        except ImportError:
            cuda_ops = None
        _cuda_state["ops"] = cuda_ops if cuda_ops is not None and cuda_ops.available() else None
    return _cuda_state["ops"]


def _compiled_lora(t: torch.Tensor) -> bool:
    """Whether the LoRA ops on t go to the compiled CPU kernels (bf16 on a CPU with AVX-512 BW)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and cpu_kernels.lora_available()


def _dense_plan(ids: torch.Tensor, slots: int, rows: int):
    """For the all-slots form: (slot subset or None for the whole stack, ids into it, one-hot (B, N') of
    those ids by dtype); None: gather per row.

    The whole stack when the batch uses at least half of its slots (no copy); else only the slots the
    batch uses, copied once (few distinct adapters); rows per slot computed stay under the bound.
    Plans are cached by content: every layer of a forward sees the same ids (ids is a small host tensor).
    """
    key = (slots, rows, DENSE_MAX_ROWS_X_SLOTS, tuple(ids.tolist()))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 256:
            _plans.clear()
        plan = _plans[key] = _make_plan(ids, slots, rows)
    return plan


def _make_plan(ids: torch.Tensor, slots: int, rows: int):
    used, local = torch.unique(ids, return_inverse=True)
    if rows * slots <= DENSE_MAX_ROWS_X_SLOTS and 2 * used.numel() >= slots:
        used, local = None, ids.clone()
    elif rows * used.numel() > DENSE_MAX_ROWS_X_SLOTS:
        return None
    n = slots if used is None else used.numel()
    return used, local, _OneHot(local, n)


class _OneHot(dict):
    """dtype -> (B, N') one-hot of the local ids, built on first use."""

    def __init__(self, local: torch.Tensor, n: int):
        super().__init__()
        self.local, self.n = local, n

    def __missing__(self, dtype):
        value = self[dtype] = (torch.arange(self.n, device=self.local.device) == self.local[:, None]).to(dtype)
        return value


# --- batched LoRA ---------------------------------------------------------------------------------


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The down-projection of every row through its own adapter (Punica's "shrink").

    Semantics (for every b, t; n = ids[b]):
        h[b, t] = (x[b, t].float() @ A_stack[n].float().T).to(x.dtype)

    x (B, T, Din) bf16 | fp16 | fp32, contiguous; A_stack (N, R, Din) same dtype, contiguous;
    ids (B,) int64 in [0, N) (one slot per row; all T tokens of a row use it).
    Returns h (B, T, R) in x.dtype: fp32 accumulation, rounded once.
    """
    ops = _cuda_ops(x)
    if ops is not None:
        return ops.lora_shrink(x, A_stack, ids)
    if _compiled_lora(x):
        return cpu_kernels.lora_shrink(x.contiguous(), A_stack, ids, check=False)  # stacks: built by the pool
    Bsz, T, Din = x.shape
    plan = _dense_plan(ids, A_stack.shape[0], Bsz * T)
    if plan is not None:
        used, ids, _ = plan
        A = A_stack if used is None else A_stack.index_select(0, used)  # (N', R, Din)
        N, R, _ = A.shape
        h_all = F.linear(x, A.view(N * R, Din)).view(Bsz, T, N, R)  # (B, T, N', R)
        return h_all.gather(2, ids.view(Bsz, 1, 1, 1).expand(Bsz, T, 1, R)).view(Bsz, T, R)
    A_rows = A_stack.index_select(0, ids)  # (B, R, Din); index_select is ~5x faster than A_stack[ids] here
    return torch.bmm(x, A_rows.transpose(1, 2))  # (B, T, Din) @ (B, Din, R) -> (B, T, R)


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    B_stack: torch.Tensor,
    ids: torch.Tensor,
    scaling: torch.Tensor,
    dora_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add every row's scaled up-projection to the base output, then apply the row's DoRA scale; in place.

    Semantics (for every b, t; n = ids[b]):
        hs = (h[b, t].float() * scaling[n]).to(y.dtype)                      # (R,)
        v = (y[b, t].float() + hs.float() @ B_stack[n].float()).to(y.dtype)  # fp32 accumulation, one rounding
        y[b, t] = (v.float() * dora_scale[n].float()).to(y.dtype)            # only when dora_scale is given
    The sum is rounded once, as PEFT on a plain nn.Linear base (SEMANTICS §4.1); PEFT's bitsandbytes
    path rounds the LoRA term before the add, which costs one more pass over y for at most one ulp.
    DoRA (SEMANTICS §5.3): y = g * (x W^T + s B A x) + b with g = dora_scale[n]; the caller computes
    the base output without bias and adds the bias after this op.

    y (B, T, Dout) bf16 | fp16 | fp32, contiguous, updated in place and returned; h (B, T, R) y.dtype;
    B_stack (N, R, Dout) y.dtype, contiguous (lora_B transposed); ids (B,) int64 in [0, N);
    scaling (N,) fp32; dora_scale (N, Dout) fp32 or None (None == all ones: no DoRA adapter loaded).
    The torch CPU path rounds the gathered scale rows to y.dtype before multiplying (an in-place bf16 x fp32
    multiply is ~20x slower on CPU than bf16 x bf16): one more rounding, within one ulp of the output;
    the compiled bf16 kernel multiplies by the fp32 scale, as written above.
    """
    ops = _cuda_ops(y)
    if ops is not None:
        return ops.lora_expand(y, h, B_stack, ids, scaling, dora_scale)
    if _compiled_lora(y) and y.is_contiguous():
        return cpu_kernels.lora_expand(y, h.contiguous(), B_stack, ids, scaling, dora_scale, check=False)
    Bsz, T, R = h.shape
    Dout = B_stack.shape[2]
    hs = (h * scaling.index_select(0, ids).view(Bsz, 1, 1)).to(y.dtype)  # (B, T, R), tiny
    plan = _dense_plan(ids, B_stack.shape[0], Bsz * T)
    if plan is not None:
        # Place each row's hs in its slot's R columns (zeros elsewhere), then one GEMM over the slots.
        used, _, onehots = plan
        Bs = B_stack if used is None else B_stack.index_select(0, used)  # (N', R, Dout)
        N = Bs.shape[0]
        onehot = onehots[y.dtype]  # (B, N')
        h_all = (hs[:, :, None, :] * onehot[:, None, :, None]).view(Bsz * T, N * R)  # (B*T, N'*R)
        y.view(Bsz * T, Dout).addmm_(h_all, Bs.view(N * R, Dout))
    else:
        y.baddbmm_(hs, B_stack.index_select(0, ids))  # (B, T, R) @ (B, R, Dout)
    if dora_scale is not None:
        y.mul_(dora_scale.index_select(0, ids).to(y.dtype).view(Bsz, 1, Dout))
    return y


# --- NF4 -------------------------------------------------------------------------------------------


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """Dequantize an NF4 weight into a preallocated buffer (SEMANTICS §1.4-1.5), bit-exact.

    Semantics (i over the flattened, row-major weight; q_i = the high nibble of packed[i // 2] for even
    i, the low nibble for odd i; CODE = the 16 NF4 values, SEMANTICS §1.1):
        out.view(-1)[i] = (CODE[q_i] * absmax[i // blocksize]).to(out.dtype)   # product in fp32, then RNE

    packed uint8 with out.numel() / 2 bytes (any shape, e.g. bitsandbytes' (n/2, 1)), contiguous;
    absmax (n / blocksize,) fp32 (double quant already decoded: NF4Weight.absmax_float32());
    out (Dout, Din) bf16 | fp16 | fp32, contiguous, written and returned. Needs out.numel() even and a
    multiple of blocksize (every real weight; other shapes use runtime.nf4.dequantize).
    """
    ops = _cuda_ops(out)
    if ops is not None:
        return ops.nf4_dequantize(packed, absmax, blocksize, out)

    # The compiled kernels are CPU-only: other devices without their own ops take the torch code below.
    is_cpu_fusable = out.device.type == "cpu" and blocksize == cpu_kernels.G and out.dtype == torch.bfloat16
    if is_cpu_fusable and cpu_kernels.available():
        return cpu_kernels.nf4_dequantize(packed, absmax, out.shape[0], out.shape[1], out=out)
    from adapterhub.runtime import nf4

    codes = packed.view(-1, 1).expand(-1, 2).contiguous()  # (n/2, 2): [high, low] nibble of each byte
    codes[:, 0] >>= 4
    codes[:, 1] &= 0x0F
    values = nf4.NF4_CODE.to(out.device)[codes.view(-1, blocksize).long()]  # (n/G, G) fp32
    torch.mul(values, absmax.view(-1, 1), out=values)
    out.view(-1, blocksize).copy_(values)
    return out


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out_features: int, in_features: int
) -> torch.Tensor:
    """A linear layer over an NF4 weight, without bias.

    Semantics:
        W = nf4_dequantize(packed, absmax, blocksize, empty(out_features, in_features, dtype=x.dtype))
        y = (x.float() @ W.float().T).to(x.dtype)

    x (..., Din) bf16 | fp16 | fp32, contiguous; packed, absmax as in :func:`nf4_dequantize`.
    Returns y (..., Dout) in x.dtype. Fused kernels (the CPU kernel for few rows, the CUDA GEMV) may use
    bf16(CODE) * absmax instead of bf16(CODE * absmax) and another summation order: within TOLERANCE.
    Larger inputs dequantize into a per-thread scratch buffer reused across layers, then one GEMM.
    """
    ops = _cuda_ops(x)
    if ops is not None:
        return ops.nf4_linear(x, packed, absmax, blocksize, out_features, in_features)

    rows = x.numel() // in_features
    fusable = (x.device.type == "cpu" and blocksize == cpu_kernels.G and in_features % cpu_kernels.G == 0
               and x.dtype in (torch.bfloat16, torch.float32))
    # available() first: it loads the library, which sets FUSED_MAX_ROWS for this CPU.
    if fusable and cpu_kernels.available() and rows <= cpu_kernels.FUSED_MAX_ROWS:
        return cpu_kernels.nf4_linear(x, packed, absmax, out_features, in_features)
    W = nf4_dequantize(packed, absmax, blocksize, _scratch_weight(out_features, in_features, x.dtype, x.device))
    return F.linear(x, W)


def _scratch_weight(Dout: int, Din: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (Dout, Din) buffer per thread, shape, dtype and device, reused by every NF4 layer of that shape:
    dequantizing into it keeps one dense copy per shape instead of one per layer."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (Dout, Din, dtype, device)
    if key not in buffers:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buffers[key] = torch.empty(Dout, Din, dtype=dtype, device=device)
    return buffers[key]
