"""Checkpoints: a run killed with SIGKILL in the middle of writing a checkpoint resumes from the previous one
and ends with the same adapter, bit for bit (fp32, dropout on), and the same loss curve as a run never
interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from adapterhub.adapter import Adapter
from adapterhub.runtime.base import load_base
from adapterhub.train import train
from adapterhub.train.checkpoint import STATE_FILE, checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(method="dora", r=4, lora_alpha=8, lora_dropout=0.1, lr=2e-3, max_steps=9, batch_size=4,
                warmup=2, schedule="cosine", seed=3, save_every=3, progress_bar=False)

# Trains with SETTINGS and SIGKILLs itself while the second checkpoint (step 6) is being written: its files are
# in the temporary directory, not yet swapped in.
KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys, torch
    from adapterhub import fsio
    from adapterhub.runtime.base import load_base
    from adapterhub.train import train
    data, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    swap, calls = fsio._swap_in, []
    def swap_in(tmp, dest, force):
        calls.append(dest)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return swap(tmp, dest, force)
    fsio._swap_in = swap_in
    base = load_base("tiny", quantize=None, compute_dtype=torch.float32)
    train(base, data, output_dir=out, **settings)
""")


def _data(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n")
    return path


def test_kill_during_a_checkpoint_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    data = _data(tmp_path / "train.jsonl")
    base = load_base("tiny", quantize=None, compute_dtype=torch.float32)
    whole = train(base, data, output_dir=tmp_path / "whole", **SETTINGS)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(data), str(tmp_path / "killed"),
                          json.dumps(SETTINGS)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    saved = checkpoint_dir(tmp_path / "killed")
    state = torch.load(saved / STATE_FILE, weights_only=False)
    assert state["progress"]["step"] == 3  # the first checkpoint, whole; the second never landed
    assert any(p.name.startswith(".checkpoint.") for p in saved.parent.iterdir())  # its temp dir, left behind

    resumed = train(base, data, output_dir=tmp_path / "killed", resume=True, **SETTINGS)
    assert resumed.progress.losses == whole.progress.losses
    assert resumed.progress.step == 9
    assert resumed.tensors.keys() == whole.tensors.keys()
    for key, t in whole.tensors.items():
        assert t.data == resumed.tensors[key].data, f"{key} differs after resuming"
    lora_B = [np.frombuffer(t.data, np.float32) for k, t in whole.tensors.items() if "lora_B" in k]
    assert all(np.abs(b).max() > 0 for b in lora_B)  # training moved every B away from its zero init
    on_disk = Adapter.from_peft_dir(tmp_path / "killed" / "adapter")
    assert on_disk.safetensors_bytes() == whole.safetensors_bytes()
