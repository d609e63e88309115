"""Blockwise absmax quantization in torch: the encoder `Ops.quantize_blockwise` runs (any device).

Semantics (docs/semantics.md §1.2-§1.4, §2.1): the input is flattened row-major and cut into blocks of G
elements; absmax[k] = max |x| over block k (a short last block takes the max of what it holds); each
element is scaled s = x * fp32(1 / max(absmax, 1e-38)) (the reciprocal first, as bitsandbytes) and gets
its codebook's code (kernels/codebook.py). 16-value codebooks are packed two codes per byte,
element 2k in the high nibble, an odd n ending in the code of 0.0; larger ones give one uint8 per element.

Shapes: n elements, G = blocksize, B = ceil(n / G) blocks. Work runs in chunks through per-thread
buffers (Ops.run_chunks); every step is a float32 or int32 op with an `out=`, so nothing allocates per chunk.
"""

from __future__ import annotations

import torch

from adapterhub.runtime.kernels.codebook import Codebook
from adapterhub.runtime.quant.tables import MIN_DIVISOR

_INT8, _PACK = torch.tensor(8, dtype=torch.int16), torch.tensor(4097, dtype=torch.int16)


def encode(ops, x: torch.Tensor, codebook: Codebook, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) float -> (codes uint8 (ceil(n/2),) packed for 16 values else (n,), absmax float32 (B,)).

    A short last block is zero-padded: zeros change no block max, and the padded codes are dropped (an odd
    n keeps the padding's code in its last low nibble: the code of 0.0, semantics §1.4)."""
    n, device = x.numel(), x.device
    per = 2 if codebook.values.numel() == 16 else 1  # elements per output byte
    full = n - n % G
    codes = torch.empty(-(-n // per), dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // G), dtype=torch.float32, device=device)
    step = ops.chunk(full)

    def scratch():  # s (C,) float32, key and idx (C,) int32
        C = max(G, step)
        return torch.empty(C, device=device), *torch.empty(2, C, dtype=torch.int32, device=device)

    def work(i, j, buffers):
        _encode_chunk(x[i:j], G, codebook, codes[i // per : j // per], absmax[i // G : j // G], *buffers)

    ops.run_chunks(full, step, work, scratch)
    if full < n:
        tail = torch.zeros(G, dtype=torch.float32, device=device)
        tail[: n - full] = x[full:]
        tail_codes = torch.empty(G // per, dtype=torch.uint8, device=device)
        _encode_chunk(tail, G, codebook, tail_codes, absmax[-1:], *scratch())
        codes[full // per :] = tail_codes[: codes.numel() - full // per]
    return codes, absmax


def _encode_chunk(src, G, codebook, codes_out, absmax_out, s, key, idx):
    """src (m,) float, m % G == 0 -> codes into codes_out, absmax float32 (m/G,) into absmax_out.
    s (m,) float32, key and idx (m,) int32 are scratch buffers."""
    m = src.numel()
    s, key, idx = s[:m], key[:m], idx[:m]
    if src.dtype != torch.float32:
        src = s.copy_(src)  # exact widening; then every step below is a float32 op
    scratch = key.view(torch.float32)
    torch.abs(src, out=scratch)
    torch.amax(scratch.view(-1, G), dim=1, out=absmax_out)
    recip = torch.div(1.0, absmax_out.clamp(min=MIN_DIVISOR))  # (m/G,) reciprocal first, as bnb (§1.2)
    torch.mul(src.view(-1, G), recip[:, None], out=s.view(-1, G))  # (m/G, G)
    codes = codebook.coder.codes(s, key, idx)  # (m,) int32 sorted positions
    if codebook.order is not None:  # position -> code (FP4 stores its values sign-magnitude)
        codes = torch.index_select(codebook.order.to(codes.device), 0, codes, out=key)
    if codebook.values.numel() != 16:
        codes_out.copy_(codes)  # int32 -> uint8 keeps the low byte
        return
    # §1.4, element 2k in the high nibble: an int16 pair p = c[2k] + 256 c[2k+1] (little-endian) times
    # 4097 holds 16 c[2k] + c[2k+1] in bits 8..15 (the product only wraps above bit 15)
    free = idx if codes.data_ptr() == key.data_ptr() else key  # the int32 buffer not holding the codes
    pairs = free.view(torch.uint8)[:m].copy_(codes).view(torch.int16)  # (m/2,)
    packed = torch.mul(pairs, _PACK, out=s.view(torch.int16)[: m // 2])
    codes_out.copy_(packed.bitwise_right_shift_(_INT8))
