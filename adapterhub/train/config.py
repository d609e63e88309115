"""TrainConfig: every training setting, validated once when built (the CLI and `train()` build it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from adapterhub.errors import ConfigError, check_known_keys

METHODS = ("lora", "dora")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """What `train()` does. `max_steps` (optimizer steps) wins over `epochs` when given; a step consumes
    `batch_size * grad_accum` examples. `target_modules`: PEFT's names, a regex, or "all-linear"."""

    method: str = "lora"
    r: int = 16
    lora_alpha: float = 32.0
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    lora_dropout: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup: int = 0  # optimizer steps of linear warm-up from 0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    max_grad_norm: float | None = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = None

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.method in METHODS, f"method {self.method!r} is not one of {', '.join(METHODS)}; use 'lora' or "
             "'dora' (QLoRA is method 'lora' on a base loaded with quantize='nf4')")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        need(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha!r}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}")
        for name in ("batch_size", "grad_accum", "max_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.max_len >= 2, f"max_len must be at least 2 tokens, got {self.max_len}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be a number of steps >= 0, got "
             f"{self.warmup!r}")
        need(self.max_steps is not None or self.epochs > 0, f"epochs must be positive, got {self.epochs!r}")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value > 0),
                 f"{name} must be a positive integer or None, got {value!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be positive or None (no clipping), got {self.max_grad_norm!r}")

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_known_keys(cls, d, "training settings")
        d = dict(d)
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)
