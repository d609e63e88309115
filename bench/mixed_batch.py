"""Mixed-adapter batches vs one merged adapter (and vs PEFT's mixed batch when peft is installed).

Llama: hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000, bf16 (dense base). 32 rows;
r = 16 on all 7 linears; N = 1, 4, 16, 32 distinct adapters (row b uses adapter b mod N); LoRA and DoRA.
Prefill: 64 tokens per row, logits at the last token. Decode: one token per row against a 64-token
KV cache. Reports tokens/s (medians) and the ratio to one merged adapter in the same run: the merged
model's speed is timed after a real merge_adapter; each ratio is the median over back-to-back pairs of
a plain ids=None forward (the same ops and shapes as merged weights) and the mixed forward, so it
stays meaningful on a shared machine. PEFT (LoRA only: it refuses DoRA in mixed batches) is timed the
same way against its own adapter_names=["__base__"] forward. The adapter dtype section times LoRA with
adapters kept in bf16 (`adapter_dtype="auto"`, the compiled kernels) against fp32 adapters inside the bf16
base (`"float32"`, PEFT's numerics), each as a ratio to the plain forward.

    python -m bench.mixed_batch [--quick] [--no-peft] [--adapter-dtype-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adapterhub.adapter import random_adapter
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.kv_cache import KVCache
from adapterhub.runtime.model.loader import build_model
from adapterhub.runtime.adapters.merge import merge_adapter, unmerge
from adapterhub.runtime.adapters.pool import AdapterPool
from adapterhub.runtime.model.tiny import random_weights
from bench.timing import median_seconds

CONFIG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
)
ROWS, PROMPT, RANK = 32, 64, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



def paired(baseline, candidate, repeats: int) -> tuple[float, float]:
    """(median seconds of candidate, median of baseline/candidate over back-to-back pairs): pairing keeps
    the ratio meaningful when other processes share the cores."""
    baseline(), candidate()  # warm-up
    times, ratios = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        candidate()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(times), statistics.median(ratios)


def make_workloads(model):
    """(prefill, decode) closures taking ids (B,) or None."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CONFIG.vocab_size, (ROWS, PROMPT), generator=g)
    last = torch.full((ROWS,), PROMPT - 1)
    cache = KVCache(CONFIG.num_hidden_layers, ROWS, CONFIG.num_key_value_heads, PROMPT + 8, CONFIG.head_dim,
                    dtype=torch.bfloat16)
    cache.allocate(range(ROWS), [PROMPT + 1] * ROWS)  # the blocks of a 64-token prompt and the decoded token
    step = cache.step(torch.arange(ROWS), 1, starts=torch.full((ROWS,), PROMPT))  # decode at position 64
    token = torch.randint(0, CONFIG.vocab_size, (ROWS, 1), generator=g)

    @torch.inference_mode()
    def prefill(ids):
        return model(prompt, ids, logits_at=last)

    @torch.inference_mode()
    def decode(ids):
        return model(token, ids, cache=cache, step=step)

    return prefill, decode


def bench_runtime(model, pool, adapters, kind: str, counts, repeats: int, rows_out: list):
    """Mixed batches vs the merged model: one real merge is timed for the table; the ratios pair each
    mixed forward with a plain ids=None forward (the same ops and shapes as the merged weights)."""
    start = time.perf_counter()
    for i, adapter in enumerate(adapters):
        pool.add(adapter, f"{kind}{i}")
    install = (time.perf_counter() - start) / len(adapters)
    prefill, decode = make_workloads(model)
    merge_adapter(pool.linears, pool, f"{kind}0")
    merged = {"prefill": median_seconds(lambda: prefill(None), repeats), "decode": median_seconds(lambda: decode(None), repeats),
              "install": install}
    unmerge(pool.linears, pool)
    for n in counts:
        ids = pool.acquire([f"{kind}{b % n}" for b in range(ROWS)])
        for phase, fn, tokens in (("prefill", prefill, ROWS * PROMPT), ("decode", decode, ROWS)):
            t, ratio = paired(lambda: fn(None), lambda: fn(ids), repeats)
            rows_out.append((kind, n, phase, tokens / t, ratio))
            print(f"  measured {kind} N={n} {phase}: {tokens / t:.1f} tok/s, {ratio:.2f}x merged", flush=True)
        pool.release(ids)
    for i in range(len(adapters)):
        pool.remove(f"{kind}{i}")
    return merged


def bench_adapter_dtype(model, adapters, counts, repeats: int) -> list:
    """LoRA mixed batches with the stacks in bf16 ("auto") and in fp32 inside the bf16 base ("float32"):
    [(dtype, N, phase, tokens/s, ratio to the plain forward)]."""
    out = []
    prefill, decode = make_workloads(model)
    for label, dtype in (("auto (bf16)", torch.bfloat16), ("float32", torch.float32)):
        pool = AdapterPool(model.linears(), capacity=max(counts), adapter_dtype=dtype)
        for i, adapter in enumerate(adapters):
            pool.add(adapter, f"a{i}")
        for n in counts:
            ids = pool.acquire([f"a{b % n}" for b in range(ROWS)])
            for phase, fn, tokens in (("prefill", prefill, ROWS * PROMPT), ("decode", decode, ROWS)):
                t, ratio = paired(lambda: fn(None), lambda: fn(ids), repeats)
                out.append((label, n, phase, tokens / t, ratio))
                print(f"  measured adapter dtype {label} N={n} {phase}: {tokens / t:.1f} tok/s, {ratio:.2f}x plain",
                      flush=True)
            pool.release(ids)
        for i in range(len(adapters)):
            pool.remove(f"a{i}")
    for linear in model.linears().values():
        linear.set_adapter_dtype(torch.bfloat16)
    return out


def bench_peft(weights, adapters, counts, repeats: int):
    """PEFT mixed batch (adapter_names=) on transformers' Llama, same weights and adapters; LoRA only
    (PEFT refuses DoRA in mixed batches, semantics §7). Returns {(n, phase): tokens/s}."""
    import tempfile

    import transformers
    from peft import PeftModel

    hf_config = transformers.LlamaConfig(
        vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size, intermediate_size=CONFIG.intermediate_size,
        num_hidden_layers=CONFIG.num_hidden_layers, num_attention_heads=CONFIG.num_attention_heads,
        num_key_value_heads=CONFIG.num_key_value_heads, head_dim=CONFIG.head_dim, rms_norm_eps=CONFIG.rms_norm_eps,
        rope_theta=CONFIG.rope_theta, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in weights.items()}, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        for i, adapter in enumerate(adapters):
            adapter.save_peft_dir(f"{tmp}/a{i}")
        peft_model = PeftModel.from_pretrained(model, f"{tmp}/a0", adapter_name="a0")
        for i in range(1, len(adapters)):
            peft_model.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    peft_model = peft_model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CONFIG.vocab_size, (ROWS, PROMPT), generator=g)
    token = torch.randint(0, CONFIG.vocab_size, (ROWS, 1), generator=g)
    base_names = ["__base__"] * ROWS  # PEFT's own baseline: the same model, no adapter applied
    out = {}
    with torch.inference_mode():
        cache = peft_model(prompt, adapter_names=base_names, use_cache=True).past_key_values

        def decode(names):
            peft_model(token, adapter_names=names, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token just appended

        for n in counts:
            names = [f"a{b % n}" for b in range(ROWS)]
            t, ratio = paired(lambda: peft_model(prompt, adapter_names=base_names, logits_to_keep=1),
                              lambda: peft_model(prompt, adapter_names=names, logits_to_keep=1), repeats)
            out[(n, "prefill")] = (ROWS * PROMPT / t, ratio)
            t, ratio = paired(lambda: decode(base_names), lambda: decode(names), repeats)
            out[(n, "decode")] = (ROWS / t, ratio)
            print(f"  measured peft N={n}: prefill {out[(n, 'prefill')][1]:.2f}x, decode {ratio:.2f}x its base", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 32 only and 3 repeats")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    parser.add_argument("--adapter-dtype-only", action="store_true", help="only the adapter dtype section")
    args = parser.parse_args()
    counts, repeats = ((1, 32), 3) if args.quick else ((1, 4, 16, 32), 7)
    weights = random_weights(CONFIG, seed=0)
    model = build_model(CONFIG, weights.__getitem__, weights, quantize=None, dtype=torch.bfloat16, device="cpu")
    pool = AdapterPool(model.linears(), capacity=max(counts))
    shapes = {m: (layer.out_features, layer.in_features) for m, layer in pool.linears.items()}

    def adapters(dora: bool):
        return [random_adapter(shapes, r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, use_dora=dora, seed=s)
                for s in range(max(counts))]

    rows: list = []
    lora = adapters(False)
    by_dtype = bench_adapter_dtype(model, lora, counts, repeats)
    print(f"adapter dtype (LoRA r={RANK}, all linears, bf16 base, {ROWS} rows; ratio to the plain forward):")
    print(f"{'adapter dtype':<13} {'N':>3} {'phase':<8} {'tok/s':>9} {'x plain':>8}")
    for label, n, phase, tps, ratio in by_dtype:
        print(f"{label:<13} {n:>3} {phase:<8} {tps:>9.1f} {ratio:>8.2f}")
    if args.adapter_dtype_only:
        return
    merged = {"lora": bench_runtime(model, pool, lora, "lora", counts, repeats, rows)}
    dora = adapters(True)
    merged["dora"] = bench_runtime(model, pool, dora, "dora", counts, repeats, rows)
    peft = {}
    if not args.no_peft:
        try:
            peft = bench_peft(weights, lora, counts, repeats)
        except ImportError:
            print("(peft / transformers not installed: no PEFT comparison)")
    print(f"threads={torch.get_num_threads()} rows={ROWS} prompt={PROMPT} r={RANK} all linears, bf16, repeats={repeats}")
    # What one decode step must read (bf16): why decode is bound by memory bandwidth at large N.
    base_mb = (sum(layer.weight.nbytes for layer in pool.linears.values()) + model.lm_head.weight.numel() * 2) / 1e6
    per_adapter_mb = sum(RANK * (i + o) for o, i in shapes.values()) * 2 / 1e6
    print(f"decode step reads {base_mb:.0f} MB of base weights (decoder linears + lm_head) and {per_adapter_mb:.1f} MB "
          f"per distinct adapter ({max(counts) * per_adapter_mb:.0f} MB at N={max(counts)})")
    for kind, phases in merged.items():
        print(f"merged {kind}: prefill {ROWS * PROMPT / phases['prefill']:.0f} tok/s, decode {ROWS / phases['decode']:.1f} tok/s; "
              f"pool.add {phases['install'] * 1e3:.0f} ms per adapter")
    print(f"{'kind':<5} {'N':>3} {'phase':<8} {'tok/s':>9} {'x merged':>9} {'PEFT tok/s':>11} {'PEFT x base':>12}")
    for kind, n, phase, tps, ratio in rows:
        p_tps, p_ratio = peft.get((n, phase), (None, None)) if kind == "lora" else (None, None)
        p_cols = f"{p_tps:>11.1f} {p_ratio:>12.2f}" if p_tps else f"{'-':>11} {'-':>12}"
        print(f"{kind:<5} {n:>3} {phase:<8} {tps:>9.1f} {ratio:>9.2f} {p_cols}")


if __name__ == "__main__":
    main()
