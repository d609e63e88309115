"""Resident memory stays bounded over prefills of varied lengths, and bounding it changes no result.

On the CPU, torch runs bf16 / fp16 GEMMs through oneDNN, which keeps a primitive (~0.65 MB of heap) per
distinct shape in two caches of 1024 entries; a prefill's GEMMs have B*T rows, so varied prompt lengths
grew RSS by hundreds of MB (kernels/ops.py's module docstring). The ops pad those GEMMs' rows to a few
sizes (`gemm_rows`); a GEMM's rows do not depend on each other, so the real rows' results are unchanged:
bit-identical logits in fp32 (with the padding forced on: by default it runs for bf16 / fp16 only) and
in bf16, base alone and with mixed LoRA / DoRA adapters, dense and NF4, compiled and torch ops.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapterhub.adapter import random_adapter
from adapterhub.runtime import generate as gen
from adapterhub.runtime import kernels, load_base
from adapterhub.runtime.kernels import Ops
from adapterhub.runtime.kernels.ops import GEMM_EXACT_ROWS, gemm_rows

ROOT = Path(__file__).resolve().parents[2]
GROWTH_BOUND_MB = 32  # after warm-up; before the fix 200 such prefills added ~300-400 MB

# Runs in a fresh process: RSS is the process's, and no other test has warmed or grown oneDNN's caches.
MEASURE = textwrap.dedent("""
    import random, sys, torch
    from adapterhub.runtime import load_base
    from adapterhub.runtime.kernels.ops import GEMM_EXACT_ROWS, gemm_rows

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    quantize = None if sys.argv[1] == "none" else sys.argv[1]
    base = load_base("tiny", quantize=quantize, compute_dtype=torch.bfloat16)
    MAX_B, MAX_T, V, rng = 3, 300, base.config.vocab_size, random.Random(0)
    cache = base.new_cache(MAX_B, MAX_T)

    def prefill(lengths):
        rows = list(range(len(lengths)))
        base.prefill(cache, rows, [[rng.randrange(V) for _ in range(n)] for n in lengths], None)
        cache.free(rows)

    # Warm-up: every GEMM row count a bucketed prefill of up to 3 x 300 tokens runs, once.
    for t in range(1, GEMM_EXACT_ROWS + 1):
        prefill([t])
    for bucket in sorted({gemm_rows(m) for m in range(GEMM_EXACT_ROWS + 1, MAX_B * MAX_T + 1)}):
        B = -(-min(bucket, MAX_B * MAX_T) // MAX_T)
        prefill([min(bucket, MAX_B * MAX_T) // B] * B)
    warm = rss_mb()
    for _ in range(200):
        prefill([rng.randint(1, MAX_T) for _ in range(rng.randint(1, MAX_B))])
    print(warm, rss_mb())
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_rss_stays_bounded_over_varied_bf16_prefills(quantize):
    run = subprocess.run([sys.executable, "-c", MEASURE, quantize], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    warm, end = map(float, run.stdout.split())
    assert end - warm < GROWTH_BOUND_MB, f"RSS grew {end - warm:.0f} MB ({warm:.0f} -> {end:.0f}) over 200 prefills"


def test_gemm_rows_are_few_and_pad_little():
    sizes = [gemm_rows(m) for m in range(1, 16385)]
    assert sizes[:GEMM_EXACT_ROWS] == list(range(1, GEMM_EXACT_ROWS + 1))  # decode batches run as they are
    assert all(m <= s <= m * 1.125 for m, s in enumerate(sizes, 1))
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert len(set(sizes)) == GEMM_EXACT_ROWS + 72  # 8 per doubling from 32 to 16384
    assert all(s % 4 == 0 for s in sizes[GEMM_EXACT_ROWS:])


def test_default_bucketing_is_reduced_precision_on_the_cpu():
    assert Ops("cpu").bucketed_dtypes == {torch.bfloat16, torch.float16}
    assert Ops("meta").bucketed_dtypes == frozenset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_pads_rows_without_changing_them(dtype):
    ops = Ops("cpu", bucketed_dtypes={dtype})
    g = torch.Generator().manual_seed(0)
    W, bias = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    for shape in [(1, 5, 64), (3, 33, 64), (2, 150, 64), (700, 64)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        y = ops.linear(x, W, bias)
        assert y.shape == (*shape[:-1], 96) and y.is_contiguous()
        assert torch.equal(y, F.linear(x, W, bias)), shape


@pytest.mark.parametrize("dense_max_rows_x_slots", [10**9, 0], ids=["dense_over_slots", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_ops_pad_rows_without_changing_them(dtype, dense_max_rows_x_slots):
    padded = Ops("cpu", dense_max_rows_x_slots=dense_max_rows_x_slots, bucketed_dtypes={dtype})
    exact = Ops("cpu", dense_max_rows_x_slots=dense_max_rows_x_slots, bucketed_dtypes=())
    g = torch.Generator().manual_seed(1)
    B, T, N, R, Din, Dout = 3, 37, 4, 8, 64, 48  # T and B*T both between row buckets
    x = torch.randn(B, T, Din, generator=g).to(dtype)
    A, Bst = torch.randn(N, R, Din, generator=g).to(dtype), torch.randn(N, R, Dout, generator=g).to(dtype)
    ids, scaling = torch.tensor([2, 0, 3]), torch.rand(N, generator=g) + 0.5
    dora = torch.rand(N, Dout, generator=g) + 0.5
    y0 = torch.randn(B, T, Dout, generator=g).to(dtype)
    h = exact.lora_shrink(x, A, ids)
    assert torch.equal(padded.lora_shrink(x, A, ids), h)
    for d in (None, dora):
        want = exact.lora_expand(y0.clone(), h, Bst, ids, scaling, d)
        assert torch.equal(padded.lora_expand(y0.clone(), h, Bst, ids, scaling, d), want)


def _prefill_and_forward(base, prompts, ids):
    """Prefill logits (B, V) and full-forward logits of the real tokens (padding zeroed)."""
    cache = base.new_cache(len(prompts), max(map(len, prompts)))
    T = max(map(len, prompts))
    tokens, mask = torch.zeros(len(prompts), T, dtype=torch.long), torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)], mask[b, : len(p)] = torch.tensor(p), 1
    with torch.inference_mode():
        last = gen.prefill(base.model, cache, list(range(len(prompts))), prompts, ids)
        full = base.model(tokens, ids, attention_mask=mask) * mask[..., None]
    return last, full


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "adapters"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bucketed_gemms_leave_logits_bit_identical(monkeypatch, dtype, quantize, adapters):
    base = load_base("tiny", quantize=quantize, compute_dtype=dtype)
    names = []
    if adapters:
        shapes = base.module_shapes()
        names = [base.add_adapter(random_adapter(shapes, r=8, target_modules="all-linear", use_dora=dora, seed=i,
                                                 lora_alpha=64), f"a{i}") for i, dora in enumerate((False, True))]
    ops = kernels.ops_for(base.model.device)
    rng = random.Random(5)
    V = base.config.vocab_size
    for B, lengths in [(1, [150]), (2, [37, 90]), (3, [300, 1, 45]), (5, [9, 13, 3, 7, 11])]:
        assert gemm_rows(B * max(lengths)) > B * max(lengths)  # every case runs padded GEMMs
        prompts = [[rng.randrange(V) for _ in range(n)] for n in lengths]
        ids = base.pool.acquire([rng.choice([*names, None]) for _ in range(B)]) if names else None
        monkeypatch.setattr(ops, "bucketed_dtypes", frozenset())
        want = _prefill_and_forward(base, prompts, ids)
        monkeypatch.setattr(ops, "bucketed_dtypes", frozenset({dtype}))  # fp32 too: padding must not show
        got = _prefill_and_forward(base, prompts, ids)
        if ids is not None:
            base.pool.release(ids)
        assert torch.equal(got[0], want[0]), (dtype, lengths)
        assert torch.equal(got[1], want[1]), (dtype, lengths)
