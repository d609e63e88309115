"""Shared test setup for tests/serve_ray: the adapters, prompts, the offline reference and /metrics parsing."""

from __future__ import annotations

import re

import torch

from adapterhub.registry import Registry
from adapterhub.runtime import load_base

# task -> random_adapter options: LoRA, rsLoRA and DoRA, different ranks and targets (all with non-zero lora_B).
ADAPTERS = {
    "summarize": dict(r=8, target_modules=("q_proj", "v_proj")),
    "sql": dict(r=16, use_rslora=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "translate": dict(r=4, use_dora=True, target_modules=("q_proj", "v_proj", "down_proj")),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "SELECT name FROM",
           "Translate: good morning", "héllo wörld ☕"]


def make_base(max_adapters: int = 16):
    return load_base("tiny", compute_dtype=torch.float32, max_adapters=max_adapters)


class Offline:
    """Expected completions: `base.generate` on a separate base in this process, one request at a time."""

    def __init__(self, registry: Registry):
        self.base = make_base()
        self.registry = registry

    def complete(self, model: str | None, prompt: str, max_tokens: int) -> str:
        adapters = None
        if model is not None:
            ref = self.registry.resolve(model)
            if ref.digest not in self.base.pool.names():
                self.base.add_adapter(self.registry.load(f"{ref.task}@{ref.digest}"), name=ref.digest)
            adapters = [ref.digest]
        return self.base.generate([prompt], adapters=adapters, max_new_tokens=max_tokens, temperature=0.0)[0].text


_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text → (name, labels, value) per sample."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def total(text: str, name: str) -> float:
    return sum(value for n, _, value in metrics(text) if n == name)


def per_replica(text: str, name: str) -> dict[str, float]:
    return {labels["replica"]: value for n, labels, value in metrics(text) if n == name}
