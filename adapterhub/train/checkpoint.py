"""Training checkpoints: `<output_dir>/checkpoint`, a directory replaced as a whole (fsio.replace_dir).

It holds the adapter as a PEFT dir (adapter_config.json, adapter_model.safetensors: float32, so the values
are exact) and `trainer_state.pt`: optimizer and scheduler state, the torch RNG state (dropout), the
data position, the step, the loss history and the wall time so far. `replace_dir` writes the new
directory beside the old one and swaps it in with one rename, so a kill -9 at any moment leaves the
previous checkpoint (or the new one) whole; resuming from it replays the same batches, dropout masks
and updates, hence the same losses and, in fp32, the same final adapter bit for bit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from adapterhub.adapter import Adapter
from adapterhub.errors import ConfigError
from adapterhub.fsio import replace_dir
from adapterhub.runtime.adapters.trainable import TrainableAdapter

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


@dataclass
class Progress:
    """Where a run is: optimizer steps done, the data position and what it measured so far."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # examples of the current epoch's order already consumed
    losses: list[float] = field(default_factory=list)  # train loss per step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    tokens: int = 0  # input tokens processed
    seconds: float = 0.0  # wall time spent training, across resumes


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT


def save(output_dir: str | Path, adapter: Adapter, optimizer, scheduler, progress: Progress,
         config: Mapping[str, Any]) -> Path:
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "progress": vars(progress), "config": dict(config)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = {**adapter.peft_files(), STATE_FILE: buffer.getvalue()}
    return replace_dir(checkpoint_dir(output_dir), files, force=True)


def load(output_dir: str | Path, trainables: Mapping[str, TrainableAdapter], optimizer, scheduler,
         config: Mapping[str, Any]) -> Progress:
    """Restores a run saved by `save` into freshly built trainables / optimizer / scheduler."""
    path = checkpoint_dir(output_dir)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"nothing to resume: {path} holds no {STATE_FILE}; run without resume to start "
                          "training, or point output_dir at the run to continue")
    state = torch.load(path / STATE_FILE, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("save_every", "eval_every")}
    wanted = {k: v for k, v in dict(config).items() if k not in ("save_every", "eval_every")}
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ConfigError(f"the checkpoint in {path} was trained with other settings ({', '.join(changed)}); "
                          "resume with the same settings, or start a new output_dir")
    adapter = Adapter.from_peft_dir(path)
    with torch.no_grad():
        for name, module in adapter.modules().items():
            t = trainables[name]
            t.lora_A.copy_(torch.from_numpy(module.lora_A))
            t.lora_B.copy_(torch.from_numpy(module.lora_B))
            if t.lora_magnitude_vector is not None:
                t.lora_magnitude_vector.copy_(torch.from_numpy(module.magnitude))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return Progress(**state["progress"])
