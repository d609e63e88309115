"""`Ops`: the runtime's hot-path ops for one device, in torch — the slow twin every faster one is tested against.

Each op states what it computes in a ``Semantics:`` block (torch notation, per row) with the shape and
dtype of every argument. Subclasses override an op for the inputs they have a kernel for and defer to
these methods otherwise: ``CpuOps`` (kernels/cpu.py: the compiled CPU kernels) and ``CudaOps``
(kernels/cuda.py: the ``cuda/`` extension). ``kernels.ops_for(device)`` picks one per device, once;
tests compare each override with this class (kernels/tolerance.py). A new device (MPS, ROCm) is one
subclass plus one line in ``ops_for``.

Every op here is differentiable in its floating inputs (autograd through plain torch ops), so training
runs on this class: subclasses send inputs that need a gradient here (``needs_grad``).

Vocabulary: B rows, T tokens per row, Din / Dout features, N adapter slots, R rank, G quant block size.
Adapter stacks: ``A_stack (N, R, Din)`` is lora_A per slot, ``B_stack (N, R, Dout)`` is lora_B
**transposed** per slot (each slot's rank rows contiguous, so all slots form one ``(N*R, Dout)`` matrix).
Slot 0 is "no adapter": zero A and B, ``dora_scale`` 1. A 4-bit weight is ``packed`` uint8 (n/2 bytes,
element 2k in the high nibble, semantics §1.4), ``absmax`` (n/G,) float32 (double quant decoded) and a
:class:`Codebook` of 16 values (semantics §1.1 for NF4).

State lives on the object and is bounded: a plan cache (LRU), one dequantize scratch buffer per thread
and weight shape (LRU), and the thread pool of :meth:`run_chunks`.

GEMM shapes (:meth:`linear`, and the LoRA ops' torch GEMMs): on the CPU, torch runs bf16 / fp16 matmuls
through oneDNN, which creates a primitive per distinct shape (about 0.65 MB of heap each, whatever the
weight size) and keeps it in two caches of 1024 entries (oneDNN's primitive cache and ideep's, each sized
only by an environment variable read at the first matmul; both must drop an entry to free it). A prefill
has B*T rows, so varied prompt lengths grew resident memory by ~0.65 MB per new row count and weight shape
(398 MB -> 930 MB in 90 s of serving). These ops pad the rows of such a GEMM with zero rows up to one of a
few sizes (:func:`gemm_rows`); a GEMM's output rows do not depend on its other rows, so the real rows are
bit-identical (tests/runtime/test_memory.py). fp32 CPU GEMMs (MKL) keep no per-shape state and run as
they are; so do GEMMs of up to GEMM_EXACT_ROWS rows (decode: one row per sequence) and GEMMs under autograd.
The LoRA ops' slot-subset form still varies its GEMMs' width with the number of distinct adapters in a
batch (at most one shape per count, per row bucket; only where the compiled LoRA kernels do not run).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from adapterhub.runtime.kernels import blockwise
from adapterhub.runtime.kernels.codebook import Codebook

# Without compiled LoRA kernels the ops compute every slot for every row (one GEMM over the (N*R, D)
# stack, then a select) while rows x slots stays below this (slots: the whole stack, or only those the
# batch uses when that is under half of it); otherwise they gather each row's A / B and use bmm.
# bench/mixed_batch.py (D 1024-2816, R 16): the all-slots form wins at decode (each adapter read once,
# no per-row copies), the gathered form at prefill (T = 64) with many distinct adapters.
DENSE_MAX_ROWS_X_SLOTS = 8192
PLAN_CACHE_SIZE = 256  # every layer of a forward sees the same ids: one plan per distinct batch
SCRATCH_SHAPES = 8  # dequantize buffers kept per thread (a Llama has 4-5 distinct linear shapes)
CPU_CHUNK = 1 << 15  # run_chunks' step on CPU: under torch's grain size (32768), so ops stay on one thread
GEMM_EXACT_ROWS = 32  # GEMMs of up to this many rows (decode batches, the fused 4-bit kernel's rows) are not padded
GEMM_BUCKETS_PER_OCTAVE = 8  # padded row counts per doubling: at most 1/8 (12.5%) more rows, ~6% on average


def gemm_rows(rows: int) -> int:
    """The row count a bucketed GEMM of `rows` rows runs at: `rows` up to GEMM_EXACT_ROWS, else the next multiple
    of 2^k / GEMM_BUCKETS_PER_OCTAVE for 2^k < rows <= 2^(k+1) (36, 40, ..., 64, 72, 80, ..., 128, 144, ...): 8 sizes
    per doubling; 104 row counts in all up to 16384 rows (32 exact, 72 padded)."""
    if rows <= GEMM_EXACT_ROWS:
        return rows
    step = (1 << (rows - 1).bit_length()) // (2 * GEMM_BUCKETS_PER_OCTAVE)
    return -(-rows // step) * step


class Ops:
    name = "torch"
    fused_4bit_max_rows = 0  # rows up to which linear_4bit runs a fused kernel (0: never)

    def __init__(self, device: torch.device | str, *, dense_max_rows_x_slots: int = DENSE_MAX_ROWS_X_SLOTS,
                 bucketed_dtypes: frozenset[torch.dtype] | None = None):
        self.device = torch.device(device)
        self.dense_max_rows_x_slots = dense_max_rows_x_slots
        # GEMMs in these dtypes run at gemm_rows(rows) rows (module docstring); default: bf16 / fp16 on the
        # CPU, where oneDNN keeps per-shape state. An empty set turns bucketing off (bench/prefill_memory.py).
        if bucketed_dtypes is None:
            bucketed_dtypes = frozenset({torch.bfloat16, torch.float16} if self.device.type == "cpu" else ())
        self.bucketed_dtypes = frozenset(bucketed_dtypes)
        self._plans: OrderedDict = OrderedDict()
        self._local = threading.local()  # .scratch: OrderedDict per thread
        self._pools: dict[int, ThreadPoolExecutor] = {}  # by worker count
        self._tables: dict[str, torch.Tensor] = {}  # codebook name -> byte pairs on this device
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"

    @staticmethod
    def needs_grad(*tensors: torch.Tensor | None) -> bool:
        """Whether autograd must see this op (then only plain torch ops may run)."""
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    # --- dense GEMM ----------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A linear layer with a bounded set of GEMM shapes.

        Semantics:
            y = F.linear(x, W, bias)          # bit-identical: only the number of rows the GEMM runs changes

        x (..., Din), W (Dout, Din), bias (Dout,) | None, one dtype. Returns y (..., Dout), contiguous. When
        padded_rows(rows, dtype) > rows (rows = x.numel() / Din), x's rows are copied into a zero-padded
        (padded, Din) buffer and y is a view of the first rows of the padded product.
        """
        Din = x.shape[-1]
        rows = x.numel() // max(Din, 1)
        padded = self.padded_rows(rows, x.dtype)
        if padded == rows or self.needs_grad(x, W, bias):
            return F.linear(x, W, bias)
        y = F.linear(_pad_rows(x.reshape(rows, Din), padded), W, bias)  # (padded, Dout)
        return y[:rows].view(*x.shape[:-1], W.shape[0])

    def padded_rows(self, rows: int, dtype: torch.dtype) -> int:
        """Rows a GEMM of `rows` rows in `dtype` runs at: gemm_rows(rows) for the bucketed dtypes, else rows."""
        return gemm_rows(rows) if dtype in self.bucketed_dtypes else rows

    # --- batched LoRA (Punica's shrink / expand) ---------------------------------------------------

    def lora_shrink(self, x: torch.Tensor, A_stack: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The down-projection of every row through its own adapter.

        Semantics (for every b, t; n = ids[b]):
            h[b, t] = (x[b, t].float() @ A_stack[n].float().T).to(x.dtype)

        x (B, T, Din) bf16 | fp16 | fp32, contiguous; A_stack (N, R, Din) same dtype, contiguous;
        ids (B,) int64 in [0, N) (one slot per row; all T tokens of a row use it).
        Returns h (B, T, R) in x.dtype: fp32 accumulation, rounded once.
        """
        Bsz, T, Din = x.shape
        plan = self._dense_plan(ids, A_stack.shape[0], Bsz * T)
        if plan is not None:
            used, local, _ = plan
            A = A_stack if used is None else A_stack.index_select(0, used)  # (N', R, Din)
            N, R, _ = A.shape
            h_all = self.linear(x, A.reshape(N * R, Din)).view(Bsz, T, N, R)  # (B, T, N', R)
            return h_all.gather(2, local.view(Bsz, 1, 1, 1).expand(Bsz, T, 1, R)).view(Bsz, T, R)
        A_rows = A_stack.index_select(0, ids)  # (B, R, Din); index_select is ~5x faster than A_stack[ids] here
        Tp = T if self.needs_grad(x, A_rows) else self.padded_rows(T, x.dtype)  # bucketed tokens (rows per GEMM)
        h = torch.bmm(_pad_tokens(x, Tp), A_rows.transpose(1, 2))  # (B, T', Din) @ (B, Din, R) -> (B, T', R)
        return h if Tp == T else h[:, :T]

    def lora_expand(self, y: torch.Tensor, h: torch.Tensor, B_stack: torch.Tensor, ids: torch.Tensor,
                    scaling: torch.Tensor, dora_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Add every row's scaled up-projection to the base output, then apply the row's DoRA scale; in place.

        Semantics (for every b, t; n = ids[b]):
            hs = (h[b, t].float() * scaling[n]).to(y.dtype)                      # (R,)
            v = (y[b, t].float() + hs.float() @ B_stack[n].float()).to(y.dtype)  # fp32 accumulation, one rounding
            y[b, t] = (v.float() * dora_scale[n].float()).to(y.dtype)            # only when dora_scale is given
        The sum is rounded once, as PEFT on a plain nn.Linear base (semantics §4.1); PEFT's bitsandbytes
        path rounds the LoRA term before the add, which costs one more pass over y for at most one ulp.
        DoRA (semantics §5.3): y = g * (x W^T + s B A x) + b with g = dora_scale[n]; the caller computes
        the base output without bias and adds the bias after this op.

        y (B, T, Dout) bf16 | fp16 | fp32, contiguous, updated in place and returned; h (B, T, R) y.dtype;
        B_stack (N, R, Dout) y.dtype, contiguous (lora_B transposed); ids (B,) int64 in [0, N);
        scaling (N,) fp32; dora_scale (N, Dout) fp32 or None (None == all ones: no DoRA adapter loaded).
        This torch version rounds the gathered scale rows to y.dtype before multiplying (an in-place
        bf16 x fp32 multiply is ~20x slower on CPU than bf16 x bf16): one more rounding, within one ulp.
        """
        Bsz, T, R = h.shape
        Dout = B_stack.shape[2]
        hs = (h * scaling.index_select(0, ids).view(Bsz, 1, 1)).to(y.dtype)  # (B, T, R), tiny
        plan = self._dense_plan(ids, B_stack.shape[0], Bsz * T)
        if plan is not None:
            # Place each row's hs in its slot's R columns (zeros elsewhere), then one GEMM over the slots.
            used, _, onehots = plan
            Bs = B_stack if used is None else B_stack.index_select(0, used)  # (N', R, Dout)
            N = Bs.shape[0]
            h_all = (hs[:, :, None, :] * onehots[y.dtype][:, None, :, None]).view(Bsz * T, N * R)  # (B*T, N'*R)
            rows = Bsz * T
            padded = rows if self.needs_grad(y, h, B_stack) else self.padded_rows(rows, y.dtype)
            if padded == rows:
                y.view(rows, Dout).addmm_(h_all, Bs.reshape(N * R, Dout))
            else:  # bucketed rows (module docstring): the sum is still rounded once
                y.view(rows, Dout).copy_(_pad_rows(y.view(rows, Dout), padded).addmm_(
                    _pad_rows(h_all, padded), Bs.reshape(N * R, Dout))[:rows])
        else:
            Tp = T if self.needs_grad(y, h, B_stack) else self.padded_rows(T, y.dtype)
            B_rows = B_stack.index_select(0, ids)  # (B, R, Dout)
            if Tp == T:
                y.baddbmm_(hs, B_rows)  # (B, T, R) @ (B, R, Dout)
            else:
                y.copy_(_pad_tokens(y, Tp).baddbmm_(_pad_tokens(hs, Tp), B_rows)[:, :T])
        if dora_scale is not None:
            y.mul_(dora_scale.index_select(0, ids).to(y.dtype).view(Bsz, 1, Dout))
        return y

    def _dense_plan(self, ids: torch.Tensor, slots: int, rows: int):
        """For the all-slots form: (slot subset or None for the whole stack, ids into it, one-hots (B, N') by
        dtype); None: gather per row. The whole stack when the batch uses at least half its slots (no
        copy); else only the slots the batch uses, copied once; rows x slots computed stay under the bound.
        Cached by content (ids is a small host tensor here; every layer of a forward sees the same ids)."""
        key = (slots, rows, ids.device, tuple(ids.tolist()))
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        used, local = torch.unique(ids, return_inverse=True)
        if rows * slots <= self.dense_max_rows_x_slots and 2 * used.numel() >= slots:
            plan = None, ids.clone(), _OneHot(ids.clone(), slots)
        elif rows * used.numel() > self.dense_max_rows_x_slots:
            plan = None
        else:
            plan = used, local, _OneHot(local, used.numel())
        with self._lock:
            self._plans[key] = plan
            if len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    # --- 4-bit weights ------------------------------------------------------------------------------

    def dequantize_4bit(self, packed: torch.Tensor, absmax: torch.Tensor, codebook: Codebook, blocksize: int,
                        out: torch.Tensor) -> torch.Tensor:
        """Dequantize a 4-bit weight into a preallocated buffer, bit-exact (semantics §1.4-1.5).

        Semantics (i over the flattened, row-major weight; q_i = the high nibble of packed[i // 2] for even
        i, the low nibble for odd i):
            out.view(-1)[i] = (codebook.values[q_i] * absmax[i // blocksize]).to(out.dtype)  # fp32 product, RNE

        packed uint8 with ceil(n/2) bytes (any shape); absmax (ceil(n/G),) fp32; out (any shape, n
        elements) fp32 | bf16 | fp16, contiguous, written and returned. A short last block is allowed.
        """
        n, G = out.numel(), blocksize
        flat, packed = out.view(-1), packed.reshape(-1)
        table = self._byte_pairs(codebook)
        full = n - n % G

        def scratch():  # byte indices (C/2,) int32, byte pairs of float32 values (C/2,) int64
            C = max(G, self.chunk(full))
            return torch.empty(C // 2, dtype=torch.int32, device=out.device), torch.empty(C // 2, dtype=torch.int64,
                                                                                          device=out.device)

        def work(i, j, buffers):
            idx, pairs = (b[: (j - i) // 2] for b in buffers)
            idx.copy_(packed[i // 2 : j // 2])
            values = torch.index_select(table, 0, idx, out=pairs).view(torch.float32).view(-1, G)  # (m/G, G)
            scale = absmax[i // G : j // G, None]  # (m/G, 1)
            if out.dtype == torch.float32:
                torch.mul(values, scale, out=flat[i:j].view(-1, G))
            else:
                flat[i:j].copy_(values.mul_(scale).view(-1))  # fp32 product, then RNE (semantics §1.5)

        self.run_chunks(full, self.chunk(full), work, scratch)
        if full < n:
            values = table[packed[full // 2 :].long()].view(torch.float32)[: n - full]
            flat[full:].copy_(values * absmax[-1])
        return out

    def linear_4bit(self, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: Codebook,
                    blocksize: int, out_features: int, in_features: int) -> torch.Tensor:
        """A linear layer over a 4-bit weight, without bias.

        Semantics:
            W = dequantize_4bit(packed, absmax, codebook, blocksize, empty(out_features, in_features, dtype=x.dtype))
            y = (x.float() @ W.float().T).to(x.dtype)

        x (..., Din) bf16 | fp16 | fp32, contiguous. Returns y (..., Dout) in x.dtype. Fused kernels (the CPU
        kernel for few rows, the CUDA GEMV) may use bf16(CODE) * absmax instead of bf16(CODE * absmax) and
        another summation order: within kernels/tolerance.py. Here: dequantize into a per-thread scratch
        buffer reused by every layer of that shape, then one GEMM (:meth:`linear`, rows bucketed).
        """
        W = self.scratch(out_features, in_features, x.dtype)
        return self.linear(x, self.dequantize_4bit(packed, absmax, codebook, blocksize, W))

    @torch.no_grad()
    def quantize_blockwise(self, x: torch.Tensor, codebook: Codebook, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise absmax quantization (kernels/blockwise.py has the Semantics), not differentiable.

        x (n,) fp32 | bf16 | fp16, contiguous. Returns (codes uint8: (ceil(n/2),) packed for 16-value
        codebooks, else (n,); absmax (ceil(n/G),) float32).
        """
        return blockwise.encode(self, x, codebook, blocksize)

    def _byte_pairs(self, codebook: Codebook) -> torch.Tensor:
        table = self._tables.get(codebook.name)
        if table is None:
            table = self._tables[codebook.name] = codebook.byte_pairs.to(self.device)
        return table

    # --- buffers and CPU parallelism ---------------------------------------------------------------

    def scratch(self, Dout: int, Din: int, dtype: torch.dtype) -> torch.Tensor:
        """A (Dout, Din) buffer of this thread, reused by every 4-bit layer of that shape (one dense copy per
        shape, not per layer); the least recently used beyond SCRATCH_SHAPES are dropped."""
        buffers = getattr(self._local, "scratch", None)
        if buffers is None:
            buffers = self._local.scratch = OrderedDict()
        key = (Dout, Din, dtype)
        buffer = buffers.get(key)
        if buffer is None:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buffer = buffers[key] = torch.empty(Dout, Din, dtype=dtype, device=self.device)
            if len(buffers) > SCRATCH_SHAPES:
                buffers.popitem(last=False)
        buffers.move_to_end(key)
        return buffer

    def chunk(self, full: int) -> int:
        """run_chunks' step: CPU_CHUNK on CPU; the whole range elsewhere (one launch per op on a GPU)."""
        return CPU_CHUNK if self.device.type == "cpu" else max(full, 1)

    def run_chunks(self, full: int, step: int, work, make_scratch) -> None:
        """work(start, stop, scratch) for the steps of [0, full), on torch.get_num_threads() Python threads,
        each with its own make_scratch(). Torch releases the GIL inside ops, and CPU ops this small never
        enter torch's thread pool, whose per-op barrier stalls whenever a core is shared."""
        starts = range(0, full, step)
        workers = min(torch.get_num_threads(), len(starts))
        # Autograd modes are thread-local: the workers run in the caller's, or in-place writes into tensors
        # made under inference_mode (a weight quantized inside a serving thread) would be refused.
        is_inference, is_grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run(part: int) -> None:
            with torch.inference_mode(is_inference), torch.set_grad_enabled(is_grad):
                scratch = make_scratch()
                for start in starts[part::workers]:
                    work(start, min(start + step, full), scratch)

        if workers <= 1:
            for part in range(workers):
                run(part)
            return
        with self._lock:
            pool = self._pools.get(workers) or self._pools.setdefault(workers, ThreadPoolExecutor(workers, "adapterhub"))
        list(pool.map(run, range(workers)))  # re-raises a worker's exception


class _OneHot(dict):
    """dtype -> (B, N') one-hot of the local ids, built on first use."""

    def __init__(self, local: torch.Tensor, n: int):
        super().__init__()
        self.local, self.n = local, n

    def __missing__(self, dtype):
        value = self[dtype] = (torch.arange(self.n, device=self.local.device) == self.local[:, None]).to(dtype)
        return value


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (M, K) copied into a new (rows, K) tensor whose rows past M are zero."""
    out = t.new_empty(rows, t.shape[1])
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].zero_()
    return out


def _pad_tokens(t: torch.Tensor, T: int) -> torch.Tensor:
    """t (B, T0, K) itself when T0 == T, else copied into a new (B, T, K) tensor whose tokens past T0 are zero."""
    if t.shape[1] == T:
        return t
    out = t.new_empty(t.shape[0], T, t.shape[2])
    out[:, : t.shape[1]].copy_(t)
    out[:, t.shape[1] :].zero_()
    return out
