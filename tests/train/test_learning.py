"""Training really learns: the embedded tiny model learns to uppercase 3-letter strings ("abc=" -> "ABC")
with each method (LoRA, QLoRA, DoRA, QLoRA + DoRA), and the version pushed to a registry, loaded on a fresh
base, answers held-out prompts correctly through `generate`; the untrained base answers none of them."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from adapterhub.registry import Registry
from adapterhub.runtime.base import load_base
from adapterhub.train import train

LOSS_BELOW = 0.1  # mean train loss per completion token (3 letters + EOS) over the last 5 steps; it starts near 6
METHODS = {"lora": ("lora", None), "qlora": ("lora", "nf4"), "dora": ("dora", None), "qlora-dora": ("dora", "nf4")}


def _words(n: int, seed: int, exclude=frozenset()) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if word not in exclude and word not in out:
            out.append(word)
    return out


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("upper")
    train_words = _words(600, seed=0)
    held_out = _words(30, seed=1, exclude=frozenset(train_words))
    for name, words in {"train.jsonl": train_words, "eval.jsonl": held_out}.items():
        with open(root / name, "w") as f:
            for w in words:
                f.write(json.dumps({"prompt": f"{w}=", "completion": w.upper()}) + "\n")
    return root, held_out


def _answers(base, prompts, adapter=None) -> list[str]:
    outs = base.generate(prompts, adapters=None if adapter is None else [adapter] * len(prompts), max_new_tokens=4)
    return [o.text for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_to_uppercase_and_the_pushed_version_generalises(tmp_path, task_files, method):
    root, held_out = task_files
    kind, quantize = METHODS[method]
    prompts = [f"{w}=" for w in held_out]
    base = load_base("tiny", quantize=quantize, compute_dtype=torch.float32)
    untrained = _answers(base, prompts)
    assert sum(a == w.upper() for a, w in zip(untrained, held_out)) == 0, untrained[:5]

    adapter = train(base, root / "train.jsonl", eval_data=root / "eval.jsonl", method=kind, r=8, lora_alpha=16,
                    lr=5e-3, epochs=2, batch_size=16, warmup=10, seed=0, progress_bar=False)
    final = sum(adapter.progress.losses[-5:]) / 5
    assert final < LOSS_BELOW, f"{method}: train loss {final:.4f} (first {adapter.progress.losses[0]:.3f})"
    assert float(adapter.lineage["train.eval_loss"]) < 2 * LOSS_BELOW

    registry = Registry(tmp_path / "store")
    ref = registry.push(adapter, "upper", annotations=adapter.lineage, base=base.identity)
    fresh = load_base("tiny", quantize=quantize, compute_dtype=torch.float32)
    name = fresh.add_adapter(str(ref), registry=registry)
    answers = _answers(fresh, prompts, name)
    correct = sum(a == w.upper() for a, w in zip(answers, held_out))
    assert correct >= 0.9 * len(held_out), f"{method}: {correct}/{len(held_out)} correct, e.g. {answers[:5]}"
    notes = registry.manifest(str(ref)).annotations
    assert notes["train.steps"] == str(adapter.progress.step) and notes["train.data.digest"].startswith("sha256:")
