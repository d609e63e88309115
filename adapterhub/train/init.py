"""Trainable adapters on a base's linears, initialised as PEFT does, and the PEFT adapter they make.

Initialisation (`init_lora_weights=True`, semantics §4.3): A ~ kaiming_uniform(a=sqrt(5)), i.e.
U(-1/sqrt(Din), 1/sqrt(Din)); B = 0; DoRA's magnitude m = ||W + s B A||_row = ||W||_row (B = 0; §5.2),
with W the dequantized weight on an NF4 base. Draws come from a generator seeded by the run's seed, in
module order, so a seed gives the same adapter every time.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from adapterhub.adapter import PEFT_DEFAULTS, Adapter, AdapterConfig, peft_key
from adapterhub.errors import ConfigError
from adapterhub.runtime.adapters.linear import AdapterLinear
from adapterhub.runtime.adapters.trainable import TrainableAdapter
from adapterhub.train.config import TrainConfig


def adapter_config(cfg: TrainConfig, base_name: str | None) -> AdapterConfig:
    """The adapter_config.json PEFT would write for this run (task_type CAUSAL_LM)."""
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    return AdapterConfig.from_dict({
        **PEFT_DEFAULTS, "r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets,
        "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora, "lora_dropout": cfg.lora_dropout,
        "base_model_name_or_path": base_name, "task_type": "CAUSAL_LM", "inference_mode": True})


def targeted(linears: Mapping[str, AdapterLinear], config: AdapterConfig) -> dict[str, AdapterLinear]:
    found = {name: layer for name, layer in linears.items() if config.matches(name)}
    if not found:
        raise ConfigError(f"target_modules={config.target_modules!r} selects none of the base's "
                          f"{len(linears)} linears (e.g. {next(iter(linears), None)!r}); use names such as "
                          "'q_proj', 'v_proj' or 'all-linear'")
    return found


def attach(linears: Mapping[str, AdapterLinear], config: AdapterConfig, dropout: float, seed: int,
           initial: Adapter | None = None) -> dict[str, TrainableAdapter]:
    """Gives every targeted linear a TrainableAdapter: PEFT's initialisation, or the tensors of `initial`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in targeted(linears, config).items():
        if layer.rank_groups:
            raise ConfigError(f"{name} holds served adapters; train on a base without loaded adapters "
                              "(remove them with base.remove_adapter)")
        R, s = config.rank(name), config.scaling(name)
        if initial is not None:
            module = initial.modules().get(name)
            if module is None:
                raise ConfigError(f"the initial adapter has no tensors for {name}, which target_modules selects")
            A, B = torch.from_numpy(module.lora_A), torch.from_numpy(module.lora_B)
            m = None if module.magnitude is None else torch.from_numpy(module.magnitude)
        else:
            A = torch.empty(R, layer.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B = torch.zeros(layer.out_features, R)
            m = None
        if config.use_dora and m is None:
            W = layer.dequantized_weight().float()
            m = torch.linalg.vector_norm(W + s * (B @ A).to(W.device), dim=1)  # (Dout,) = ||W||_row when B = 0
        layer.trainable = TrainableAdapter(A.to(layer.device), B.to(layer.device), s,
                                           None if m is None else m.to(layer.device), dropout, layer.weight,
                                           layer.dtype)
        out[name] = layer.trainable
    return out


def detach(linears: Mapping[str, AdapterLinear]) -> None:
    for layer in linears.values():
        layer.trainable = None


def to_adapter(trainables: Mapping[str, TrainableAdapter], config: AdapterConfig, cls=Adapter, **kwargs) -> Adapter:
    """The PEFT adapter (float32 tensors, PEFT's keys) holding the trainables' current values."""
    tensors = {}
    for name, t in trainables.items():
        tensors[peft_key(name, "lora_A")] = _array(t.lora_A)
        tensors[peft_key(name, "lora_B")] = _array(t.lora_B)
        if t.lora_magnitude_vector is not None:
            tensors[peft_key(name, "magnitude")] = _array(t.lora_magnitude_vector)
    return cls(config, tensors, **kwargs)


def _array(p: torch.Tensor) -> np.ndarray:
    return p.detach().to("cpu", torch.float32).contiguous().numpy().copy()
