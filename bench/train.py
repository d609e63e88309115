"""Training throughput and memory: adapterhub's `train` loop against PEFT + transformers (+ bitsandbytes for
the 4-bit base) on the same model, data and settings, in one run.

Model: a random Llama (hidden 1024, intermediate 2816, 8 layers, 16 / 4 heads, vocab 32000) written once as
a bf16 checkpoint; r=16 on all 7 linears, batch 4 x seq 256, AdamW, bf16 compute (--quick: 2 layers,
seq 128). Methods: LoRA on the bf16 base, QLoRA (NF4, double quant), DoRA, QLoRA + DoRA. Each
(implementation, method) runs in a fresh process: `warmup` untimed steps, then `steps` timed ones;
tokens/s = tokens of the timed steps / their wall time; peak = the process's peak RSS while training
(reset after loading, which maps the checkpoint file) over its RSS before the model was loaded (torch and
the libraries imported). The ratios are adapterhub over PEFT.

    python -m bench.train [--quick] [--steps N] [--methods lora,qlora,dora,qlora-dora] [--no-peft]
                          [--layers N] [--checkpointing]

Result (AMD EPYC Zen 4, 2 cores, torch 2.13.0, peft 0.21.2, bitsandbytes 0.50.2; 3 minutes):

    method      impl          tokens/s  peak MiB  plan MiB  speed x   mem x
    lora        adapterhub         549       905       791     1.36    0.53
    lora        peft               404      1702         -     1.00    1.00
    qlora       adapterhub         547       789       664     1.31    0.46
    qlora       peft               418      1722         -     1.00    1.00
    dora        adapterhub         548       945       844     1.83    0.30
    dora        peft               300      3180         -     1.00    1.00
    qlora-dora  adapterhub         523       874       717     1.73    0.28
    qlora-dora  peft               302      3094         -     1.00    1.00
    adapterhub QLoRA peak / bf16 LoRA peak: 0.87

--layers changes the decoder depth (where the decoder outweighs the embeddings and lm_head);
--checkpointing turns on gradient checkpointing in both implementations. "plan MiB" is train/plan.py's
estimate for adapterhub's run (live bytes; the measured RSS also holds what glibc's heap keeps of freed
tensors).
"""

from __future__ import annotations

import argparse
import json
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tiny import random_checkpoint
from adapterhub.train.plan import plan

CONFIG = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-5,
              max_position_embeddings=4096, tie_word_embeddings=False)
METHODS = {"lora": ("lora", None), "qlora": ("lora", "nf4"), "dora": ("dora", None), "qlora-dora": ("dora", "nf4")}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, BATCH = 16, 4


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _reset_peak() -> None:
    """Peak RSS from here on: loading a checkpoint maps its file (a bf16 copy of the weights) for a moment,
    which is loading's cost, not training's (Linux: writing 5 to clear_refs resets VmHWM)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def _batches(vocab: int, seq: int, n: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (BATCH, seq), generator=g) for _ in range(n)]


def run_ours(path: str, method: str, seq: int, warmup: int, steps: int, checkpointing: bool) -> dict:
    from adapterhub.runtime.base import load_base
    from adapterhub.train.data import Dataset, Example
    from adapterhub.train.loop import _run
    from adapterhub.train.config import TrainConfig

    kind, quantize = METHODS[method]
    warm = load_base("tiny", quantize=quantize, compute_dtype=torch.bfloat16)  # libraries and compiled kernels
    warm(torch.tensor([[1, 2]]))
    del warm
    gc.collect()
    before = _rss_mib()
    base = load_base(path, quantize=quantize, compute_dtype=torch.bfloat16)
    _reset_peak()
    examples = tuple(Example(tuple(row.tolist()), tuple(row.tolist()))
                     for b in _batches(base.config.vocab_size, seq, warmup + steps) for row in b)
    data = Dataset("bench", "sha256:" + "0" * 64, examples)
    common = dict(method=kind, r=R, lora_alpha=2 * R, target_modules=TARGETS, batch_size=BATCH, max_len=seq,
                  lr=1e-4, schedule="constant", gradient_checkpointing=checkpointing)
    _run(base, TrainConfig(max_steps=warmup, **common), data, None, None, False, None, False)
    timed = _run(base, TrainConfig(max_steps=steps, **common), data, None, None, False, None, False)
    seconds = timed.progress.seconds  # the steps' own wall time, setup excluded
    return {"tokens_per_s": steps * BATCH * seq / seconds, "peak_mib": _peak_mib() - before}


def run_peft(path: str, method: str, seq: int, warmup: int, steps: int, checkpointing: bool) -> dict:
    import peft
    import transformers

    before = _rss_mib()
    kind, quantize = METHODS[method]
    kwargs = {"dtype": torch.bfloat16}
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(TARGETS), use_dora=kind == "dora",
                             task_type="CAUSAL_LM")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, config)
    _reset_peak()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = _batches(model.config.vocab_size, seq, warmup + steps)
    start = None
    for i, ids in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * BATCH * seq / seconds, "peak_mib": _peak_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--worker", nargs=6, metavar=("IMPL", "METHOD", "PATH", "SEQ", "STEPS", "CKPT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, method, path, seq, steps, ckpt = args.worker
        fn = run_ours if impl == "adapterhub" else run_peft
        print(json.dumps(fn(path, method, int(seq), 1, int(steps), ckpt == "1")))
        return
    config = dict(CONFIG, num_hidden_layers=2) if args.quick else CONFIG
    if args.layers:
        config = dict(config, num_hidden_layers=args.layers)
    seq, steps = (128, args.steps or 3) if args.quick else (256, args.steps or 5)
    methods = args.methods.split(",")
    impls = ["adapterhub"] + ([] if args.no_peft else ["peft"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama hidden {config['hidden_size']}, "
          f"{config['num_hidden_layers']} layers, batch {BATCH} x seq {seq}, r={R} all-linear, bf16, {steps} steps"
          + (", gradient checkpointing" if args.checkpointing else ""))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "base", ModelConfig(**config), seed=0, dtype=torch.bfloat16)
        for method in methods:
            for impl in impls:
                out = subprocess.run([sys.executable, "-m", "bench.train", "--worker", impl, method, str(path),
                                      str(seq), str(steps), "1" if args.checkpointing else "0"],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{impl} {method} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                results[impl, method] = json.loads(out.stdout.strip().splitlines()[-1])
    model_config = ModelConfig(**config)
    print(f"{'method':<12}{'impl':<12}{'tokens/s':>10}{'peak MiB':>10}{'plan MiB':>10}{'speed x':>9}{'mem x':>8}")
    for method in methods:
        p = plan(model_config, method, r=R, batch=BATCH, seq=seq)
        planned = (p.total_checkpointed if args.checkpointing else p.total) / 2**20
        for impl in impls:
            r = results.get((impl, method))
            if r is None:
                continue
            ref = results.get(("peft", method))
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
            mem = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
            shown = f"{planned:.0f}" if impl == "adapterhub" else "-"
            print(f"{method:<12}{impl:<12}{r['tokens_per_s']:>10.0f}{r['peak_mib']:>10.0f}{shown:>10}{ratio:>9}{mem:>8}")
    lora, qlora = results.get(("adapterhub", "lora")), results.get(("adapterhub", "qlora"))
    if lora and qlora:
        print(f"adapterhub QLoRA peak / bf16 LoRA peak: {qlora['peak_mib'] / lora['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
