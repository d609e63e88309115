"""`adapterhub demo`: the whole product in one run on the embedded tiny model.

Three adapters of different kinds are made, pushed into a temporary registry, pulled back and
loaded into one NF4 base; one mixed batch (base rows and every adapter) is generated in a single
batched forward per step; each row is checked against that adapter run alone; and mixed-batch
throughput is compared with one adapter merged into the base (the zero-overhead baseline).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from adapterhub.adapter import random_adapter
from adapterhub.registry import Registry
from adapterhub.runtime import load_base

# Same length (20 bytes = 20 tokens): no padding in the batch, so a bf16 row is computed exactly as alone.
PROMPTS = ["The capital of Chile", "def fibonacci(nums):", "Once upon a time the", "SELECT id FROM users",
           "Translate to French:", "Summarize this news:"]


def run_demo(echo: Callable[[str], None], is_quick: bool = False) -> None:
    started = time.perf_counter()
    new_tokens, repeats = (8, 1) if is_quick else (24, 3)
    echo("== 1. Base model ==")
    # fp32 compute: every row can then be compared bit for bit with its solo run. (The bf16 kernels pick
    # their blocking by batch size, so bf16 rows agree with solo runs only to rounding.)
    base = load_base("tiny", compute_dtype=torch.float32)
    c = base.config
    storage = ", ".join(sorted({m.weight.format for m in base.model.linears().values()})).upper()
    echo(f"embedded tiny Llama: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
         f"decoder linears in {storage}, compute in {base.model.dtype} (so rows compare bit for bit).")
    echo("Its weights are random, so the text below is gibberish: what matters is that each row follows "
         "its own adapter.")

    shapes = base.module_shapes()
    weights = {name: base.model.get_submodule(name).dequantized_weight().float().numpy() for name in shapes}
    kinds = {
        "summarize": ("LoRA r=8", dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))),
        "sql": ("rsLoRA r=16", dict(r=16, lora_alpha=16, use_rslora=True,
                                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))),
        "translate": ("DoRA r=8", dict(r=8, lora_alpha=16, use_dora=True, base_weights=weights,
                                       target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))),
    }
    with tempfile.TemporaryDirectory(prefix="adapterhub-demo-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        echo("")
        echo(f"== 2. Push three adapters into a registry ({registry.location}) ==")
        refs = {}
        for seed, (task, (kind, options)) in enumerate(kinds.items(), start=1):
            adapter = random_adapter(shapes, seed=seed, **options)
            refs[task] = registry.push(adapter, task, tags=("prod",))
            echo(f"pushed {kind:<12} as {refs[task]}  ({adapter.nbytes / 1024:.0f} KiB)")
        _listing(echo, registry)

        echo("")
        echo("== 3. Pull them back and load them into the base (one pool, one slot each) ==")
        for task, ref in refs.items():
            pulled = registry.pull(f"{task}:prod", Path(tmp) / "pulled" / task)
            base.add_adapter(pulled, name=task)
            echo(f"pulled {task}:prod (= {ref}) as a PEFT dir, loaded into pool slot {base.pool.slot(task)}")

    rows = ([None] + list(kinds)) * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    echo("")
    echo(f"== 4. One mixed batch: {len(rows)} rows, each with its own adapter, decoded together ==")
    mixed = base.generate(prompts, adapters=rows, max_new_tokens=new_tokens, temperature=0.0)
    echo(f"{'row':>3}  {'adapter':<11} {'prompt':<34} output")
    for i, (name, prompt, out) in enumerate(zip(rows, prompts, mixed)):
        echo(f"{i:>3}  {name or '(base)':<11} {prompt[:33]:<34} {_clean(out.text)!r}")

    echo("")
    echo("== 5. Check: every mixed-batch row equals its adapter run alone ==")
    alone = [base.generate([p], adapters=[a], max_new_tokens=new_tokens, temperature=0.0)[0]
             for p, a in zip(prompts, rows)]
    same = sum(m.token_ids == a.token_ids for m, a in zip(mixed, alone))
    base_only = {p: base.generate([p], max_new_tokens=new_tokens, temperature=0.0)[0].token_ids for p in prompts}
    changed = [m.token_ids != base_only[p] for m, p, a in zip(mixed, prompts, rows) if a is not None]
    echo(f"{same}/{len(rows)} rows identical to the solo run; adapters change the output in "
         f"{sum(changed)}/{len(changed)} adapter rows")

    echo("")
    batch = 16 if not is_quick else 8
    echo(f"== 6. Throughput: {batch} rows x {new_tokens} new tokens ==")
    names = [list(kinds)[i % len(kinds)] for i in range(batch)]
    batch_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    mixed_tps = _tokens_per_s(lambda: base.generate(batch_prompts, adapters=names, max_new_tokens=new_tokens,
                                                     temperature=0.0), batch * new_tokens, repeats)
    base.merge("summarize")
    try:
        merged_tps = _tokens_per_s(lambda: base.generate(batch_prompts, max_new_tokens=new_tokens,
                                                          temperature=0.0), batch * new_tokens, repeats)
    finally:
        base.unmerge()
    echo(f"{'mode':<44} {'tokens/s':>9}  ratio")
    echo(f"{'mixed batch (3 adapters, one forward/step)':<44} {mixed_tps:>9.0f}  {mixed_tps / merged_tps:.2f}x")
    echo(f"{'one adapter merged into the base (baseline)':<44} {merged_tps:>9.0f}  1.00x")
    echo("(at this toy size, hidden 256, the adapter math is a large share of every step; "
         "bench/mixed_batch.py measures a 1024-hidden model)")
    echo("")
    echo(f"done in {time.perf_counter() - started:.1f} s. Next: 'adapterhub serve' and "
         "POST /v1/completions with \"model\": \"<task>:prod\".")


def _listing(echo, registry) -> None:
    echo("the registry now holds (as 'adapterhub ls' lists it):")
    echo(f"{'task':<11} {'version':<14} {'tags':<14} {'size':>10}")
    for task in sorted(registry.tasks()):
        for entry in registry.log(task):
            echo(f"{task:<11} {str(entry.ref):<14} {','.join(entry.tags):<14} {entry.nbytes / 1024:>6.0f} KiB")


def _tokens_per_s(run: Callable[[], object], tokens: int, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def _clean(text: str) -> str:
    return text.replace("\n", " ")[:48]
