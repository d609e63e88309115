"""NF4 4-bit quantization with double quantization in torch, bit-identical to `reference/nf4.py`.

Semantics (SEMANTICS.md §1-§3): the weight is flattened row-major and cut into blocks of G elements;
each element gets the NF4 code nearest to x * (1 / absmax) (a value on a midpoint takes the lower
code), two codes per byte, element 2k in the high nibble. Double quantization stores the block absmax
as 8-bit indices into the signed dynamic map over nested blocks of 256 after subtracting their torch
float32 mean (exact nearest entry, ties lower: bitsandbytes' CPU table is an approximation, §2.3).
Dequantization is float32 code * absmax, then round-to-nearest-even to the target dtype (§1.5).

Shapes: n weight elements, G = blocksize, B = ceil(n / G) blocks, B2 = ceil(B / 256).

How codes are picked fast (exact, no float64, no Python loop over elements): the float32 bit
patterns of s are cut into buckets by their top bits, each bucket holding at most one threshold
(checked when the table is built). Within a bucket a key (the bits, all flipped for negative values)
grows with s, and one int32 table F gives code = (key - F[bucket]) >> 24: F puts the bucket's
lowest code in bits 24.. and its threshold's key in the bits below, so the subtraction borrows
exactly when key <= threshold key. Pairs of uint8 codes are packed as int16 (little-endian).
Work runs in chunks of 32768 elements through per-thread buffers (_run_chunks says why the threads
are Python threads).

On the CPU, when `cpu_kernels.available()`, the NF4 codes and the dequantized whole blocks come from the
compiled kernels instead (cpu_kernels.nf4_quantize / nf4_dequantize_blocks, bit-identical: the tests
compare both paths); the torch code here stays the path for other devices and the fallback
(ADAPTERHUB_DISABLE_CPU_KERNELS=1). Double quantization of the absmax vector always runs in torch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from adapterhub.errors import QuantizationError
from adapterhub.runtime import cpu_kernels

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # §1.3
NESTED_BLOCKSIZE = 256  # §2.1
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# Elements per step: a multiple of every blocksize, and no more than torch's grain size (32768), so
# every op runs on the calling thread; chunks are spread over Python threads instead (_run_chunks).
_CHUNK = 1 << 15
_MIN_DIVISOR = 1e-38  # bitsandbytes divides by absmax.clamp(min=1e-38) (§1.2)


def _table(hex_words: str) -> torch.Tensor:
    words = [int(h, 16) for h in hex_words.split()]
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).view(torch.float32)


# §1.1, the same table as reference.nf4.NF4_CODE (tests compare them and their SHA-256).
NF4_CODE = _table(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
)
# §2.2, the same table as reference.nf4.DYNAMIC_CODE.
DYNAMIC_CODE = _table(
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 "
    "bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a "
    "bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 "
    "bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334 "
    "bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d "
    "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 "
    "bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d "
    "ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 "
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d "
    "3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 "
    "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d "
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334 "
    "3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 "
    "3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a "
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333 "
    "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000"
)


# 0-d integer operands: a Python int would be wrapped into a new tensor on every call (~3 us each)
_INT = {k: torch.tensor(k, dtype=torch.int32) for k in (17, 21, 24, 31)}
_INT8, _PACK = torch.tensor(8, dtype=torch.int16), torch.tensor(4097, dtype=torch.int16)
_CODE_BIT = 24  # codes live in bits 24.. of the coder's int32 results (see the module docstring)
if sys.byteorder != "little":
    raise ImportError("adapterhub.runtime.nf4 packs codes through int16 views: little-endian machines only")
_HALF = {k: torch.tensor(1 << (31 - k), dtype=torch.int32) for k in (17, 21)}  # bucket index offset


def _wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2**32: the table's subtraction wraps the same way."""
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


@dataclass(frozen=True)
class _Coder:
    """code(s) = number of `thresholds` strictly below s, as one table lookup (module docstring)."""

    shift: int  # a bucket is a run of 2 ** shift bit patterns
    table: torch.Tensor  # int32 (2 ** (32 - shift),), indexed by (bits >> shift) + 2 ** (31 - shift)

    @classmethod
    def build(cls, thresholds: torch.Tensor, shift: int) -> "_Coder":
        half = 1 << (31 - shift)
        first = torch.arange(-half, half, dtype=torch.int64) << shift  # first bit pattern of each bucket
        ends = torch.stack([first, first + (1 << shift) - 1])  # (2, buckets) int64
        values = _wrap_int32(ends).view(torch.float32)
        values = torch.where(values.isnan(), torch.where(ends < 0, -torch.inf, torch.inf), values)  # NaN: past inf
        lowest, highest = values.aminmax(dim=0)
        base = torch.searchsorted(thresholds, lowest)  # code of the bucket's lowest value
        inside = torch.searchsorted(thresholds, highest) - base
        if int(inside.max()) > 1:
            raise AssertionError(f"two thresholds share a bucket at shift {shift}")
        key_low = _key(ends).amin(dim=0)  # keys grow with the value inside a bucket
        key_threshold = _key(thresholds.view(torch.int32).to(torch.int64))[base.clamp(max=thresholds.numel() - 1)]
        # with a threshold: code = base + [key > key_threshold]; without: code = base
        with_threshold = key_threshold + 1 - ((base + 1) << _CODE_BIT)
        table = torch.where(inside == 1, with_threshold, key_low - (base << _CODE_BIT))
        return cls(shift, _wrap_int32(table))

    def codes(self, s: torch.Tensor, key: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s float32 (m,) -> int32 codes (m,) in out; indices >= 128 wrap negative: read them as
        uint8. key (m,) int32 is scratch; s is overwritten."""
        bits = s.view(torch.int32)
        torch.bitwise_right_shift(bits, _INT[31], out=key)
        key.bitwise_xor_(bits)  # the key: bits, all bits flipped for negative values
        torch.bitwise_right_shift(bits, _INT[self.shift], out=out).add_(_HALF[self.shift])
        torch.index_select(self.table.to(s.device), 0, out, out=bits)
        return torch.sub(key, bits, out=out).bitwise_right_shift_(_INT[_CODE_BIT])


def _key(bits: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns (any int dtype) -> keys: all bits flipped for negative values, so that keys
    grow with the value within a bucket of one sign. Both signs share keys, buckets come from bits."""
    bits = _wrap_int32(bits).to(torch.int64)
    return torch.where(bits < 0, -bits - 1, bits)


def _exact_midpoints(code: torch.Tensor) -> torch.Tensor:
    """float32 midpoints rounded down from the exact ones: the exact nearest entry, ties lower (§2.3)."""
    mid = (code[:-1].double() + code[1:].double()) / 2
    t = mid.float()
    return torch.where(t.double() > mid, torch.nextafter(t, torch.tensor(-float("inf"))), t)


NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # §1.2: bitsandbytes' float32 midpoints
DYNAMIC_THRESHOLDS = _exact_midpoints(DYNAMIC_CODE)
_NF4_CODER = _Coder.build(NF4_MIDPOINTS, shift=21)
_DYNAMIC_CODER = _Coder.build(DYNAMIC_THRESHOLDS, shift=17)
# byte -> (code[byte >> 4], code[byte & 15]) as one int64, so dequantize is a 1-D gather per byte
_BYTE_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1).view(torch.int64).view(256)


# --- blockwise encoding (§1.2-§1.4, §2.1) ---------------------------------------------------------


def _encode_chunk(src, G, coder, codes_out, absmax_out, s, key, idx):
    """src (m,) float, m % G == 0 -> codes into codes_out, absmax float32 (m/G,) into absmax_out.

    codes_out is uint8 (m/2,) packed nibbles when coder is the NF4 one, else uint8 (m,) indices.
    s (m,) float32, key and idx (m,) int32 are scratch buffers.
    """
    m = src.numel()
    s, key, idx = s[:m], key[:m], idx[:m]
    if src.dtype != torch.float32:
        src = s.copy_(src)  # exact widening; then every step below is a float32 op
    scratch = key.view(torch.float32)
    torch.abs(src, out=scratch)
    torch.amax(scratch.view(-1, G), dim=1, out=absmax_out)
    recip = torch.div(1.0, absmax_out.clamp(min=_MIN_DIVISOR))  # (m/G,) reciprocal first, as bnb (§1.2)
    torch.mul(src.view(-1, G), recip[:, None], out=s.view(-1, G))  # (m/G, G)
    codes = coder.codes(s, key, idx)  # (m,) int32
    if coder is not _NF4_CODER:
        codes_out.copy_(codes)  # int32 -> uint8 keeps the low byte
        return
    # §1.4, element 2k in the high nibble: an int16 pair p = c[2k] + 256 c[2k+1] (little-endian) times
    # 4097 holds 16 c[2k] + c[2k+1] in bits 8..15 (the product only wraps above bit 15)
    pairs = key.view(torch.uint8)[:m].copy_(codes).view(torch.int16)  # (m/2,)
    packed = torch.mul(pairs, _PACK, out=s.view(torch.int16)[: m // 2])
    codes_out.copy_(packed.bitwise_right_shift_(_INT8))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _chunk(device: torch.device, full: int) -> int:
    """Step size: _CHUNK on CPU; a whole weight in one step elsewhere (one launch per op on a GPU)."""
    return _CHUNK if device.type == "cpu" else max(full, 1)


def _run_chunks(full: int, step: int, work, make_scratch) -> None:
    """work(start, stop, scratch) for the steps of [0, full), on torch.get_num_threads() Python
    threads, each with its own make_scratch(). Torch releases the GIL inside ops, and CPU ops this
    small never enter torch's thread pool, whose per-op barrier stalls whenever a core is shared."""
    starts = range(0, full, step)
    workers = min(torch.get_num_threads(), len(starts))

    def run(part: int) -> None:
        scratch = make_scratch()
        for start in starts[part::workers]:
            work(start, min(start + step, full), scratch)

    if workers <= 1:
        for part in range(workers):
            run(part)
        return
    pool = _POOLS.get(workers) or _POOLS.setdefault(workers, ThreadPoolExecutor(workers, "adapterhub-nf4"))
    list(pool.map(run, range(workers)))  # re-raises a worker's exception


def _encode(x, G, coder):
    """x (n,) float -> (codes uint8, absmax float32 (B,)); a short last block is zero-padded: zeros
    change no block max, and padded codes are dropped (odd n keeps the code of 0.0, 7, §1.4)."""
    n, device = x.numel(), x.device
    per = 2 if coder is _NF4_CODER else 1  # elements per output byte
    full = n - n % G
    codes = torch.empty(-(-n // per), dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // G), dtype=torch.float32, device=device)

    step = _chunk(device, full)

    def scratch():  # s (C,) float32, key and idx (C,) int32
        C = max(G, step)
        return torch.empty(C, device=device), *torch.empty(2, C, dtype=torch.int32, device=device)

    def work(i, j, buffers):
        _encode_chunk(x[i:j], G, coder, codes[i // per : j // per], absmax[i // G : j // G], *buffers)

    _run_chunks(full, step, work, scratch)
    if full < n:
        tail = torch.zeros(G, dtype=torch.float32, device=device)
        tail[: n - full] = x[full:]
        tail_codes = torch.empty(G // per, dtype=torch.uint8, device=device)
        _encode_chunk(tail, G, coder, tail_codes, absmax[-1:], *scratch())
        codes[full // per :] = tail_codes[: codes.numel() - full // per]
    return codes, absmax


def _nested(absmax, nested_absmax, offset, nested_blocksize):
    """§2.1.5: fl32(fl32(code8[q8] * nested_absmax[i // 256]) + offset) -> float32 (B,)."""
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
    return DYNAMIC_CODE.to(absmax.device)[absmax.long()].mul_(scale).add_(offset)


# --- the quantized weight -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """An NF4-quantized weight in bitsandbytes' layout (SEMANTICS §3.1).

    packed: uint8 ((n+1)//2, 1), two codes per byte, high nibble first (§1.4).
    absmax: float32 (B,) block absmax, or with double quantization uint8 (B,) dynamic-map indices.
    nested_absmax: float32 (B2,) and offset: float32 0-d tensor, with double quantization only.
    shape / dtype: the original weight's shape and dtype, which dequantize returns by default.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def absmax_float32(self) -> torch.Tensor:
        """Per-block absmax as float32 (B,), double quantization undone (§2.1.5); compute once at load."""
        if not self.double_quant:
            return self.absmax
        return _nested(self.absmax, self.nested_absmax, self.offset, self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (shape) in `dtype` (default: the original dtype); see `dequantize_into`."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.packed.device)
        return dequantize_into(self, out)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' packed state dict (§3.1): keys prefix, prefix.absmax, prefix.quant_map,
        [prefix.nested_absmax, prefix.nested_quant_map,] prefix.quant_state.bitsandbytes__nf4."""
        state = {
            "quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)
        }  # fmt: skip
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": NF4_CODE.clone()}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = DYNAMIC_CODE.clone()
            nested = {"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32"}
            state.update(nested, nested_offset=self.offset.item())  # a float32 value: repr round-trips
        blob = json.dumps(state).encode("utf-8")  # default separators, this field order (§3.1)
        sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping, prefix: str = "weight") -> "NF4Weight":
        """Adopt a bitsandbytes / transformers 4-bit state dict (the keys of `state_dict`), validated."""
        return cls(**_parse_state_dict(sd, prefix))


# --- public functions -----------------------------------------------------------------------------


@torch.no_grad()  # quantization is not differentiable; a Parameter (requires_grad) is fine as input
def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float32 / bf16 / fp16 weight of any shape to NF4, as bitsandbytes'
    `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)` (§1-§2).

    The double-quant offset is torch's float32 mean of the block absmax, as bitsandbytes computes it;
    torch's summation order can depend on the thread count (1 ulp), the stored value is what counts.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in _DTYPE_NAMES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise QuantizationError(
            f"NF4 quantizes float32, bfloat16 or float16 tensors, got {got}; convert with .to(torch.bfloat16)"
        )
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize} is not one of {BLOCKSIZES}; bitsandbytes' default is 64")
    if w.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    flat = w.contiguous().view(-1)  # row-major (§1.3)
    if flat.device.type == "cpu" and cpu_kernels.available():
        packed, absmax = cpu_kernels.nf4_quantize(flat, blocksize)
    else:
        packed, absmax = _encode(flat, blocksize, _NF4_CODER)
    fields = {"packed": packed.view(-1, 1), "shape": tuple(w.shape), "dtype": w.dtype, "blocksize": blocksize}
    if not double_quant:
        return NF4Weight(absmax=absmax, **fields)
    offset = absmax.mean()  # float32 0-d (§2.1.2)
    q8, nested_absmax = _encode(absmax - offset, NESTED_BLOCKSIZE, _DYNAMIC_CODER)
    return NF4Weight(absmax=q8, nested_absmax=nested_absmax, offset=offset, **fields)


@torch.no_grad()
def dequantize_into(q: NF4Weight, out: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: out[j] = dtype(float32(NF4_CODE[code_j] * absmax[j // G])), round to nearest even (§1.5).

    out: contiguous, q.numel elements, float32 / bf16 / fp16 (any shape, e.g. (Dout, Din)).
    absmax: float32 (B,) from `q.absmax_float32()`, precomputed by callers that dequantize every forward.
    Allocates only chunk-sized scratch per worker thread; returns out.
    """
    absmax = q.absmax_float32() if absmax is None else absmax
    n, G, device = q.numel, q.blocksize, q.packed.device
    flat, packed = out.view(-1), q.packed.view(-1)
    full = n - n % G
    table = _BYTE_PAIRS.to(device)

    step = _chunk(device, full)

    def scratch():  # byte indices (C/2,) int32, byte pairs of float32 values (C/2,) int64
        C = max(G, step)
        idx = torch.empty(C // 2, dtype=torch.int32, device=device)
        return idx, torch.empty(C // 2, dtype=torch.int64, device=device)

    def work(i, j, buffers):
        idx, pairs = (b[: (j - i) // 2] for b in buffers)
        idx.copy_(packed[i // 2 : j // 2])
        values = torch.index_select(table, 0, idx, out=pairs).view(torch.float32).view(-1, G)  # (m/G, G)
        scale = absmax[i // G : j // G, None]  # (m/G, 1)
        if out.dtype == torch.float32:
            torch.mul(values, scale, out=flat[i:j].view(-1, G))
        else:
            flat[i:j].copy_(values.mul_(scale).view(-1))  # float32 product, then RNE (§1.5)

    on_kernels = device.type == "cpu" and packed.is_contiguous() and absmax.is_contiguous()
    if full and on_kernels and cpu_kernels.available():
        args = packed[: full // 2], absmax[: full // G]
        if out.dtype == torch.bfloat16 and G == cpu_kernels.G:  # the byte-shuffle kernel, ~2.5x faster
            cpu_kernels.nf4_dequantize(*args, full // G, G, out=flat[:full].view(-1, G))
        else:
            cpu_kernels.nf4_dequantize_blocks(*args, G, flat[:full])
    else:
        _run_chunks(full, step, work, scratch)
    if full < n:
        values = table[packed[full // 2 :].long()].view(torch.float32)[: n - full]
        flat[full:].copy_(values * absmax[-1])
    return out


def dequantize(q_or_state_dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An NF4Weight, or a state dict holding exactly one `<prefix>.quant_state.bitsandbytes__nf4`,
    -> the dequantized weight of the original shape in `dtype` (default: the original dtype)."""
    q = q_or_state_dict
    if isinstance(q, Mapping):
        q = NF4Weight.from_state_dict(q, _single_prefix(q))
    return q.dequantize(dtype)


# --- reading bitsandbytes / transformers state dicts (§3.1, §3.2) ---------------------------------

_STATE_SUFFIX = ".quant_state.bitsandbytes__"


def _single_prefix(sd: dict) -> str:
    prefixes = [k.split(_STATE_SUFFIX)[0] for k in sd if _STATE_SUFFIX in k]
    if len(prefixes) != 1:
        raise QuantizationError(
            f"expected exactly one '*{_STATE_SUFFIX}nf4' key, found {len(prefixes)} ({prefixes[:4]}); "
            "pass one module's keys, or call NF4Weight.from_state_dict(sd, prefix)"
        )
    return prefixes[0]


def _tensor(sd, key, dtype, numel):
    if key not in sd:
        raise QuantizationError(f"state dict lacks '{key}'; a bitsandbytes 4-bit weight needs it (SEMANTICS §3.1)")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
        got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
        raise QuantizationError(f"'{key}' must be {dtype} with {numel} elements, got {got}")
    return t.reshape(-1)


def _parse_json(sd, prefix):
    keys = [k for k in sd if k.startswith(prefix + _STATE_SUFFIX)]
    if keys != [prefix + _STATE_SUFFIX + "nf4"]:
        raise QuantizationError(
            f"'{prefix}' needs exactly one quant_state key '{prefix}{_STATE_SUFFIX}nf4', found {keys}; "
            "only NF4 is supported"
        )
    try:
        state = json.loads(bytes(sd[keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, AttributeError) as err:
        raise QuantizationError(f"'{keys[0]}' is not UTF-8 JSON bytes: {err}") from err
    shape = state.get("shape")
    if (
        state.get("quant_type") != "nf4"
        or state.get("blocksize") not in BLOCKSIZES
        or state.get("dtype") not in _DTYPES
        or not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise QuantizationError(
            f"'{keys[0]}' = {state} is not an NF4 quant state: need quant_type 'nf4', blocksize in {BLOCKSIZES}, "
            f"dtype in {sorted(_DTYPES)} and a shape of positive ints"
        )
    return state


def _parse_state_dict(sd: dict, prefix: str) -> dict:
    """Validated NF4Weight fields from a packed bitsandbytes state dict with this prefix."""
    state = _parse_json(sd, prefix)
    shape = tuple(state["shape"])
    n = 1
    for d in shape:
        n *= d
    G = state["blocksize"]
    B = -(-n // G)
    packed = sd.get(prefix)
    if isinstance(packed, torch.Tensor) and packed.dtype != torch.uint8 and packed.is_contiguous():
        packed = packed.view(torch.uint8)  # quant_storage other than uint8: the same bytes (§1.4)
    packed = _tensor({prefix: packed} if packed is not None else {}, prefix, torch.uint8, (n + 1) // 2)
    quant_map = _tensor(sd, f"{prefix}.quant_map", torch.float32, 16)
    if not torch.equal(quant_map.cpu(), NF4_CODE):
        raise QuantizationError(
            f"'{prefix}.quant_map' is not the NF4 codebook (SEMANTICS §1.1); FP4 / custom codes are not supported"
        )
    fields = {"packed": packed.view(-1, 1), "shape": shape, "dtype": _DTYPES[state["dtype"]], "blocksize": G}
    if "nested_offset" not in state:
        return {**fields, "absmax": _tensor(sd, f"{prefix}.absmax", torch.float32, B)}
    nested_blocksize = state.get("nested_blocksize")
    if state.get("nested_dtype") != "float32" or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise QuantizationError(
            f"'{prefix}': nested_dtype {state.get('nested_dtype')!r} / nested_blocksize {nested_blocksize!r} "
            "unsupported; a 'bfloat16' nested state comes from saving after an eval-mode forward on CPU "
            "(SEMANTICS §3.4): save in train mode"
        )
    nested_map = _tensor(sd, f"{prefix}.nested_quant_map", torch.float32, 256)
    if not torch.equal(nested_map.cpu(), DYNAMIC_CODE):
        raise QuantizationError(f"'{prefix}.nested_quant_map' is not the signed dynamic map (SEMANTICS §2.2)")
    return {
        **fields,
        "absmax": _tensor(sd, f"{prefix}.absmax", torch.uint8, B),
        "nested_absmax": _tensor(sd, f"{prefix}.nested_absmax", torch.float32, -(-B // nested_blocksize)),
        "offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=packed.device),
        "nested_blocksize": nested_blocksize,
    }
