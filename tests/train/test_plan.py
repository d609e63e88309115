"""The memory planner against measured peaks: each method trains for real in a fresh process (bf16, batch 4 x
seq 256, r=16 all-linear, with and without gradient checkpointing) and the peak RSS while training, over the
process's RSS before the model was loaded, is within 15% of the plan's total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tiny import random_checkpoint
from adapterhub.train.plan import plan

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                     rms_norm_eps=1e-5, max_position_embeddings=1024)
BATCH, SEQ, R = 4, 256, 16
METHODS = {"lora": ("lora", None), "qlora": ("lora", "nf4"), "dora": ("dora", None), "qlora-dora": ("dora", "nf4")}

# Loads the embedded tiny base first (the libraries, tokenizer and compiled kernels the first load brings in
# are the process's, not the model's), then the base; resets the peak (loading maps the checkpoint file for a
# moment); trains 2 steps; prints the peak over the RSS before the base was loaded, in bytes.
MEASURE = """
import gc, json, sys, torch
from adapterhub.runtime.base import load_base
from adapterhub.train.config import TrainConfig
from adapterhub.train.data import Dataset, Example
from adapterhub.train.loop import _run
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024
path, kind, quantize, checkpointing, batch, seq, r = sys.argv[1:]
warm = load_base("tiny", quantize=None if quantize == "none" else quantize, compute_dtype=torch.bfloat16)
warm(torch.tensor([[1, 2]]))
del warm
gc.collect()
before = status("VmRSS")
base = load_base(path, quantize=None if quantize == "none" else quantize, compute_dtype=torch.bfloat16)
g = torch.Generator().manual_seed(0)
rows = torch.randint(0, base.config.vocab_size, (3 * int(batch), int(seq)), generator=g).tolist()
data = Dataset("m", "sha256:" + "0" * 64, tuple(Example(tuple(x), tuple(x)) for x in rows))
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
cfg = TrainConfig(method=kind, r=int(r), lora_alpha=2 * int(r), batch_size=int(batch), max_len=int(seq),
                  max_steps=2, gradient_checkpointing=checkpointing == "1")
_run(base, cfg, data, None, None, False, None, False)
print(json.dumps({"peak": status("VmHWM") - before}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("plan") / "base", CONFIG, seed=0, dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep", "checkpointing"])
@pytest.mark.parametrize("method", list(METHODS))
def test_plan_is_within_15_percent_of_the_measured_peak(checkpoint, method, checkpointing):
    kind, quantize = METHODS[method]
    # The plan counts live bytes; glibc's fixed mmap threshold returns each freed tensor to the OS, so the peak RSS
    # measures live bytes too instead of what the allocator kept from earlier steps.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), kind, quantize or "none",
                          "1" if checkpointing else "0", str(BATCH), str(SEQ), str(R)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["peak"]
    p = plan(CONFIG, method, r=R, batch=BATCH, seq=SEQ, dtype="bfloat16")
    planned = p.total_checkpointed if checkpointing else p.total
    assert abs(planned - measured) <= 0.15 * measured, (
        f"{method}: plan {planned / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB")


def _resident_file_bytes(file: Path) -> int:
    """Bytes of `file` mapped and resident in this process (/proc/self/smaps Rss of its mappings)."""
    total, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(file):
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_a_dense_base_keeps_no_file_pages_of_the_tensors_it_copied(tmp_path):
    """The plan counts a dense base's embeddings and lm_head once: the loader copies them out of the mapped
    checkpoint and drops the file pages it read (the decoder weights, used in place, are not read yet)."""
    from safetensors.torch import load_file

    from adapterhub.runtime.base import load_base

    config = ModelConfig(**{**vars(CONFIG), "num_hidden_layers": 1})
    path = random_checkpoint(tmp_path / "base", config, seed=1, dtype=torch.bfloat16)
    file = (path / "model.safetensors").resolve()
    base = load_base(path, quantize=None, compute_dtype=torch.bfloat16)
    copied = 2 * config.vocab_size * config.hidden_size * 2  # embeddings + lm_head, bf16: 16 MiB
    resident = _resident_file_bytes(file)
    assert resident < copied / 8, f"{resident / 2**20:.1f} MiB of the checkpoint file resident after loading"
    stored = load_file(file)
    params = dict(base.model.named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(params[name], stored[name])
    # the decoder weights, which share the mapping (and its pages next to the dropped ones), read as stored
    for name, linear in base.model.linears().items():
        assert torch.equal(linear.dequantized_weight(), stored[name + ".weight"]), name
