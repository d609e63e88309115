"""`train()`: fit one LoRA / DoRA adapter on a runtime base (dense: LoRA / DoRA; NF4: QLoRA / QLoRA + DoRA).

The base stays frozen; its decoder linears get `TrainableAdapter`s (runtime/adapters/trainable.py) for the
run and lose them at the end, so the same `Base` serves the result afterwards. One optimizer step:
`grad_accum` micro-batches of `batch_size` examples, the loss of each summed over its trained tokens and
divided by the trained tokens of the whole step (every token weighs the same, however the examples are
split), torch.optim.AdamW, gradient clipping by global norm, then the learning-rate schedule
(linear / cosine decay to 0 after a linear warm-up, as transformers' schedules; or constant after it).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adapterhub.adapter import Adapter
from adapterhub.errors import ConfigError
from adapterhub.train import checkpoint
from adapterhub.train.checkpoint import Progress
from adapterhub.train.config import TrainConfig
from adapterhub.train.data import IGNORE, Dataset, Example, collate, load_jsonl
from adapterhub.train.init import adapter_config, attach, detach, to_adapter
from adapterhub.train.loss import causal_lm_loss


class TrainedAdapter(Adapter):
    """The adapter a run produced, with its lineage annotations (what `Registry.push` records) and history."""

    lineage: dict[str, str]
    progress: Progress


def schedule_factor(cfg: TrainConfig, total_steps: int):
    """step -> multiplier of lr: linear warm-up from 0 over `warmup` steps, then the schedule's decay."""

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return step / max(1, cfg.warmup)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return factor


def total_steps(cfg: TrainConfig, examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size) / cfg.grad_accum))


@functools.lru_cache(maxsize=1)  # every batch of an epoch reads the same order: drawn once, not per step
def epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The example order of one epoch: a permutation depending on (seed, epoch) only, so a resumed run
    knows every future batch from its position."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def next_batch(dataset: Dataset, cfg: TrainConfig, progress: Progress) -> list[Example]:
    """The next `batch_size` examples (fewer at the end of an epoch); advances the position."""
    n = len(dataset.examples)
    order = epoch_order(cfg.seed, progress.epoch, n)
    batch = [dataset.examples[i] for i in order[progress.index:progress.index + cfg.batch_size]]
    progress.index += len(batch)
    if progress.index >= n:
        progress.epoch, progress.index = progress.epoch + 1, 0
    return batch


@torch.no_grad()
def evaluate(model, dataset: Dataset, batch_size: int, pad_id: int) -> float:
    """Mean next-token loss per labelled token over the whole dataset."""
    total, tokens = 0.0, 0
    for i in range(0, len(dataset.examples), batch_size):
        examples = list(dataset.examples[i:i + batch_size])
        total += float(causal_lm_loss(model, collate(examples, pad_id)))
        tokens += sum(e.trained_tokens for e in examples)
    return total / tokens


def train(base, data: str | Path | Dataset, *, method: str = "lora", r: int = 16, lora_alpha: float = 32.0,
          target_modules="all-linear", use_rslora: bool = False, lora_dropout: float = 0.0, lr: float = 2e-4,
          weight_decay: float = 0.0, schedule: str = "linear", warmup: int = 0, epochs: float = 1.0,
          max_steps: int | None = None, batch_size: int = 4, grad_accum: int = 1, max_len: int = 512,
          max_grad_norm: float | None = 1.0, seed: int = 0, gradient_checkpointing: bool = False,
          eval_data: str | Path | Dataset | None = None, eval_every: int | None = None,
          save_every: int | None = None, output_dir: str | Path | None = None, resume: bool = False,
          initial: Adapter | None = None, progress_bar: bool = True) -> TrainedAdapter:
    """Trains an adapter on `base` (a runtime `Base`, dense or NF4) and returns it as a PEFT adapter.

    data / eval_data: a JSONL path (train/data.py) or a `Dataset`. QLoRA is method "lora" on a base loaded
    with quantize="nf4"; "dora" on it is QLoRA + DoRA. With `output_dir`, a checkpoint is written every
    `save_every` steps (train/checkpoint.py) and the final adapter to `<output_dir>/adapter`; `resume=True`
    continues from the checkpoint there. `initial`: start from this adapter instead of PEFT's initialisation.
    """
    if isinstance(target_modules, list):
        target_modules = tuple(target_modules)
    cfg = TrainConfig(method=method, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                      use_rslora=use_rslora, lora_dropout=lora_dropout, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, warmup=warmup, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                      grad_accum=grad_accum, max_len=max_len, max_grad_norm=max_grad_norm, seed=seed,
                      gradient_checkpointing=gradient_checkpointing, eval_every=eval_every, save_every=save_every)
    if (save_every or resume) and output_dir is None:
        raise ConfigError("save_every and resume need an output_dir to keep the checkpoint in")
    dataset = data if isinstance(data, Dataset) else load_jsonl(data, base.tokenizer, cfg.max_len)
    eval_set = eval_data if isinstance(eval_data, Dataset) or eval_data is None else load_jsonl(
        eval_data, base.tokenizer, cfg.max_len)
    return _run(base, cfg, dataset, eval_set, output_dir, resume, initial, progress_bar)


def _pad_id(base) -> int:
    c, tok = base.config, base.tokenizer
    for candidate in (getattr(c, "pad_token_id", None), tok.eos_token_id if tok is not None else None):
        if candidate is not None and 0 <= candidate < c.vocab_size:
            return int(candidate)
    return 0  # padded positions are masked out and unlabelled, so any id does


def _run(base, cfg: TrainConfig, dataset: Dataset, eval_set: Dataset | None, output_dir, resume: bool,
         initial: Adapter | None, progress_bar: bool) -> TrainedAdapter:
    model, linears = base.model, base.model.linears()
    aconfig = adapter_config(cfg, base.name)
    if initial is not None:
        ic = initial.config
        if (ic.r, ic.lora_alpha, ic.use_dora, ic.use_rslora) != (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.use_rslora):
            raise ConfigError(f"the initial adapter has r={ic.r}, lora_alpha={ic.lora_alpha}, use_dora={ic.use_dora}, "
                              f"use_rslora={ic.use_rslora}; train with the same settings")
    torch.manual_seed(cfg.seed)  # dropout draws from torch's global generator
    trainables = attach(linears, aconfig, cfg.lora_dropout, cfg.seed, initial)
    params = [p for t in trainables.values() for p in t.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    steps = total_steps(cfg, len(dataset.examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, steps))
    record = {**cfg.to_dict(), "data_digest": dataset.digest}
    pad_id = _pad_id(base)
    try:
        progress = checkpoint.load(output_dir, trainables, optimizer, scheduler, record) if resume else Progress()
        model.gradient_checkpointing = cfg.gradient_checkpointing
        for t in trainables.values():
            t.train()
        bar = tqdm(total=steps, initial=progress.step, disable=not progress_bar, unit="step", desc="train")
        while progress.step < steps:
            started = time.perf_counter()
            micro = [collate(next_batch(dataset, cfg, progress), pad_id) for _ in range(cfg.grad_accum)]
            tokens = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro))
            parts = []
            for batch in micro:
                part = causal_lm_loss(model, batch, 1.0 / tokens)
                part.backward()
                parts.append(part.detach())
            loss = float(torch.stack(parts).double().sum())  # one host sync per step, not per micro-batch
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.losses.append(loss)
            seen = sum(int(b["attention_mask"].sum()) for b in micro)
            progress.tokens += seen
            elapsed = time.perf_counter() - started
            progress.seconds += elapsed
            if eval_set is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
                progress.eval_losses.append((progress.step, _eval(model, trainables, eval_set, cfg, pad_id)))
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if output_dir is not None and cfg.save_every and progress.step % cfg.save_every == 0:
                checkpoint.save(output_dir, to_adapter(trainables, aconfig), optimizer, scheduler, progress, record)
        bar.close()
        final_eval = None
        if eval_set is not None:
            final_eval = _eval(model, trainables, eval_set, cfg, pad_id)
            if not progress.eval_losses or progress.eval_losses[-1][0] != progress.step:
                progress.eval_losses.append((progress.step, final_eval))
        adapter = to_adapter(trainables, aconfig, cls=TrainedAdapter, base=base.identity)
    finally:
        detach(linears)
        model.gradient_checkpointing = False
    adapter.progress = progress
    adapter.lineage = lineage(cfg, dataset, eval_set, progress, final_eval)
    if output_dir is not None:
        adapter.save_peft_dir(Path(output_dir) / "adapter")
    return adapter


def _eval(model, trainables, eval_set: Dataset, cfg: TrainConfig, pad_id: int) -> float:
    for t in trainables.values():
        t.eval()
    try:
        return evaluate(model, eval_set, cfg.batch_size, pad_id)
    finally:
        for t in trainables.values():
            t.train()


def lineage(cfg: TrainConfig, dataset: Dataset, eval_set: Dataset | None, progress: Progress,
            final_eval: float | None) -> dict[str, str]:
    """Annotations of the pushed version (the base identity is recorded by `Registry.push(..., base=)`)."""
    notes = {
        "train.method": cfg.method,
        "train.data.digest": dataset.digest,
        "train.data.examples": str(len(dataset.examples)),
        "train.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "train.steps": str(progress.step),
        "train.tokens": str(progress.tokens),
        "train.loss": f"{progress.losses[-1]:.6g}" if progress.losses else "",
        "train.wall_seconds": f"{progress.seconds:.1f}",
    }
    if eval_set is not None:
        notes["train.eval.digest"] = eval_set.digest
        notes["train.eval_loss"] = f"{final_eval:.6g}"
    return notes
