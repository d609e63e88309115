"""Shared test setup for tests/serve: the adapters, prompts, and the offline reference."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import httpx
import torch

from adapterhub.adapter import random_adapter
from adapterhub.registry import Registry
from adapterhub.runtime import load_base
from adapterhub.serve.engine import Engine

# task -> random_adapter options: LoRA, rsLoRA and DoRA, different ranks and targets.
ADAPTERS = {
    "summarize": dict(r=8, target_modules=("q_proj", "v_proj")),
    "sql": dict(r=16, use_rslora=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "translate": dict(r=4, use_dora=True, target_modules=("q_proj", "v_proj", "down_proj")),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "SELECT name FROM",
           "Translate: good morning", "héllo wörld ☕"]


def make_base(max_adapters: int = 8):
    return load_base("tiny", compute_dtype=torch.float32, max_adapters=max_adapters)


def make_registry(path) -> Registry:
    """A registry at `path` holding ADAPTERS (one version each, tagged prod), fitted to the tiny base."""
    registry = Registry(path)
    shapes = make_base().module_shapes()
    for seed, (task, options) in enumerate(ADAPTERS.items(), start=1):
        registry.push(random_adapter(shapes, seed=seed, **options), task, tags=("prod",))
    return registry


@dataclass
class Served:
    url: str
    engine: Engine
    client: httpx.Client

    def complete(self, **body) -> httpx.Response:
        return self.client.post("/v1/completions", json=body)


class Offline:
    """Expected completions: `base.generate` on a separate base, one request at a time."""

    def __init__(self, registry: Registry):
        self.base = make_base()
        self.registry = registry

    def complete(self, model: str | None, prompt: str, max_tokens: int, **sampling) -> str:
        """`sampling`: temperature, top_k, top_p, seed as `base.generate` takes them (default greedy)."""
        adapters = None
        if model is not None:
            ref = self.registry.resolve(model)
            if ref.digest not in self.base.pool.names():
                self.base.add_adapter(self.registry.load(f"{ref.task}@{ref.digest}"), name=ref.digest)
            adapters = [ref.digest]
        sampling = {"temperature": 0.0, **sampling}
        return self.base.generate([prompt], adapters=adapters, max_new_tokens=max_tokens, **sampling)[0].text


def wait_until_serving(process: subprocess.Popen, url: str, timeout_s: float = 120) -> None:
    """Polls `url`/health until the `adapterhub serve` child answers 200; fails with its output if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else process.returncode
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "adapterhub serve did not come up"
            time.sleep(0.2)
