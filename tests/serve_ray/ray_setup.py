"""Shared test setup for tests/serve_ray: the adapters, prompts, the offline reference and /metrics parsing."""

from __future__ import annotations

import re

# The adapters, prompts, tiny base and offline reference of the single-process server's tests: the replicas
# must answer exactly as it does.
from tests.serve.serving_setup import ADAPTERS, PROMPTS, Offline, make_base, make_registry  # noqa: F401 (shared)


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
