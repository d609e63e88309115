"""Training commands: train (fit an adapter, push it with its lineage) and plan (memory of a run, from the config)."""

from __future__ import annotations

import click

from adapterhub.cli import main
from adapterhub.cli.options import emit, open_registry, output_options, registry_option, show_progress

_DTYPES = ("bfloat16", "float32", "float16")


@main.command("train")
@click.option("--base", "-b", "base_name", default="tiny", show_default=True,
              help="Base model: 'tiny' (embedded), a Hugging Face checkpoint dir, or a hub id in the local HF cache.")
@click.option("--data", "-d", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training JSONL: {'text'}, {'prompt','completion'} or {'messages'} per line.")
@click.option("--eval", "eval_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation JSONL (same shapes); its loss is recorded in the version.")
@click.option("--task", required=True, help="Push the result as the next version of this task.")
@click.option("--tag", "-t", "tags", multiple=True, help="Also point this tag at the new version (repeatable).")
@click.option("--dora", is_flag=True, help="Train DoRA (with --quantize nf4: QLoRA + DoRA).")
@click.option("--quantize", default="nf4", show_default=True, type=click.Choice(["nf4", "fp4", "none"]),
              help="Storage of the frozen base's linears: nf4 is QLoRA; none keeps them dense in --dtype.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(_DTYPES),
              help="Compute dtype of the base (the adapter's parameters are float32 either way).")
@click.option("--r", "r", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--alpha", "lora_alpha", default=32.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--targets", default="all-linear", show_default=True,
              help="Target modules: 'all-linear', comma-separated names (q_proj,v_proj) or a regex.")
@click.option("--rslora", is_flag=True, help="Scale by alpha / sqrt(r) (rsLoRA).")
@click.option("--dropout", "lora_dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--schedule", default="linear", show_default=True, type=click.Choice(["linear", "cosine", "constant"]))
@click.option("--warmup", default=0, show_default=True, type=click.IntRange(min=0), help="Warm-up steps.")
@click.option("--epochs", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Optimizer steps (wins over --epochs).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute each decoder layer in the backward pass.")
@click.option("--eval-every", default=None, type=click.IntRange(min=1))
@click.option("--save-every", default=None, type=click.IntRange(min=1), help="Checkpoint every N steps (--output-dir).")
@click.option("--output-dir", "-o", default=None, type=click.Path(file_okay=False),
              help="Keeps checkpoints and the final PEFT adapter (<dir>/adapter).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --output-dir.")
@registry_option
@output_options
def train_command(base_name, data, eval_path, task, tags, dora, quantize, dtype, r, lora_alpha, targets, rslora,
                  lora_dropout, lr, schedule, warmup, epochs, max_steps, batch_size, grad_accum, max_len, seed,
                  gradient_checkpointing, eval_every, save_every, output_dir, resume, registry, as_json, quiet):
    """Train a LoRA / QLoRA / DoRA adapter on a base and push it as the next version of --task.

    \b
    adapterhub train --base ./llama-dir --data train.jsonl --eval eval.jsonl --task sql --tag dev
    adapterhub train --data train.jsonl --dora --quantize none --task sql --max-steps 200
    adapterhub train --data train.jsonl --task sql -o runs/sql --save-every 50 --resume
    """
    import torch

    from adapterhub.runtime import load_base
    from adapterhub.train import train

    reg = open_registry(registry, reading=False)  # a bad registry fails before the model loads
    base = load_base(base_name, quantize=None if quantize == "none" else quantize,
                     compute_dtype=getattr(torch, dtype))
    # "q_proj,v_proj" and "q_proj" are names; anything else ("all-linear", a regex) passes through as PEFT reads it
    target_modules = (tuple(t.strip() for t in targets.split(",")) if "," in targets
                      else (targets,) if targets.isidentifier() else targets)
    adapter = train(base, data, method="dora" if dora else "lora", r=r, lora_alpha=lora_alpha,
                    target_modules=target_modules, use_rslora=rslora, lora_dropout=lora_dropout, lr=lr,
                    schedule=schedule, warmup=warmup, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                    grad_accum=grad_accum, max_len=max_len, seed=seed, gradient_checkpointing=gradient_checkpointing,
                    eval_data=eval_path, eval_every=eval_every, save_every=save_every, output_dir=output_dir,
                    resume=resume, progress_bar=show_progress(as_json, quiet))
    notes = {**adapter.lineage, "train.base.quantize": quantize, "train.base.dtype": dtype}
    ref = reg.push(adapter, task, tags=tags, annotations=notes, base=base.identity)
    p = adapter.progress
    emit(as_json, quiet, {"ref": str(ref), "task": ref.task, "version": ref.version, "digest": ref.digest,
                          "tags": sorted(tags), "steps": p.step, "loss": p.losses[-1] if p.losses else None,
                          "eval_loss": p.eval_losses[-1][1] if p.eval_losses else None,
                          "annotations": notes},
         [str(ref), f"steps {p.step}, final loss {p.losses[-1]:.4f}" if p.losses else f"steps {p.step}"],
         [str(ref)])


@main.command("plan")
@click.option("--base", "-b", "base_name", default="tiny", show_default=True,
              help="Base model: 'tiny', a Hugging Face checkpoint dir or a cached hub id (only config.json is read).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["full", "lora", "qlora", "dora", "qlora-dora"]),
              help="Method to estimate (repeatable; default: all).")
@click.option("--r", "r", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--seq", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(_DTYPES))
@output_options
def plan_command(base_name, methods, r, batch, seq, dtype, as_json, quiet):
    """Estimate a training run's memory from the base's config alone: weights, grads, optimizer, activations.

    \b
    adapterhub plan --base ./llama-dir --method qlora --r 16 --batch 4 --seq 512
    adapterhub plan --base ./llama-dir --json | jq '.[] | {method, total}'
    """
    from adapterhub.runtime.model import checkpoint, tiny
    from adapterhub.train.plan import METHODS, as_dict, plan

    config = tiny.TINY_CONFIG if base_name == "tiny" else checkpoint.read_config(checkpoint.resolve_dir(base_name))
    plans = [plan(config, m, r=r, batch=batch, seq=seq, dtype=dtype) for m in (methods or METHODS)]
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    lines = [f"{'method':<11}{'weights':>10}{'grads':>10}{'optimizer':>10}{'activations':>12}{'ckpt act.':>10}"
             f"{'logits':>10}{'total':>10}{'total ckpt':>11}   MiB, batch {batch} x seq {seq}, r={r}, {dtype}"]
    lines += [f"{p.method:<11}{mib(p.weights):>10}{mib(p.grads):>10}{mib(p.optimizer):>10}{mib(p.activations):>12}"
              f"{mib(p.activations_checkpointed):>10}{mib(p.logits):>10}{mib(p.total):>10}"
              f"{mib(p.total_checkpointed):>11}" for p in plans]
    emit(as_json, quiet, [as_dict(p) for p in plans], lines, [p.method for p in plans])
