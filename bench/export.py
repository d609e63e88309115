"""Export: writing a merged checkpoint (Base.export, bf16 and NF4) against safetensors' save_file of the same
dense state dict, and PEFT's merge_and_unload + save_pretrained on the same weights and adapter, in one run.

Model: a random Llama in bf16 at Llama-3.2-1B's config (hidden 2048, intermediate 8192, 16 layers, 32 / 8
heads, vocab 128256, tied embeddings; 1.24 B parameters), or with --quick / --config 135m at SmolLM-135M's
(hidden 576, intermediate 1536, 30 layers, 9 / 3 heads, vocab 49152, tied). One r=16 LoRA on all 7 linears
is merged (the merge timed once), then each writer runs `repeats` times into a fresh directory of a temp
dir under --dir (median seconds; MB/s = bytes written / seconds; none of them fsyncs). The ratio is each
writer's seconds over save_file's. On a disk the page cache's writeback makes repeated multi-GB writes
noisy; --dir /dev/shm (tmpfs) measures what each writer costs in CPU and memory traffic alone.

    python -m bench.export [--quick] [--config 1b|135m] [--repeats N] [--dir DIR] [--no-peft]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import count
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterhub.adapter import random_adapter
from adapterhub.runtime import Base
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.loader import build_model, quantized_state
from adapterhub.runtime.model.tiny import byte_tokenizer, random_weights
from bench.timing import median_seconds

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
CONFIGS = {  # config.json of each model, less what the bench does not need
    "1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
               max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
    "135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=10000.0, max_position_embeddings=2048),
}
RANK = 16


def build_base(hf_config: dict) -> tuple[Base, dict[str, torch.Tensor]]:
    """A dense bf16 Base with random weights, and those weights in bf16 (for transformers)."""
    config = ModelConfig.from_hf_json(hf_config)
    weights = random_weights(config, seed=0)
    model = build_model(config, weights.__getitem__, weights, quantize=None, dtype=torch.bfloat16, device="cpu")
    weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    return Base(config, byte_tokenizer(), model, max_adapters=1), weights


def timed_writes(name: str, write, work: Path, repeats: int) -> tuple[str, float, int]:
    """(name, median seconds, bytes written) of write(dir), each call into a new directory."""
    dirs = (work / f"{name.split()[0]}-{i}" for i in count())
    written = []

    def once():
        path = next(dirs)
        write(path)
        written.append(sum(f.stat().st_size for f in path.iterdir()))
        shutil.rmtree(path)

    return name, median_seconds(once, repeats), written[-1]


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def peft_rows(hf_config: dict, weights: dict, adapter_dir: Path, work: Path, repeats: int) -> list:
    """merge_and_unload (once) and save_pretrained (median) on transformers' Llama with the same weights."""
    import transformers
    from peft import PeftModel

    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(torch.bfloat16).eval()
    loaded = model.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, loaded  # tied lm_head
    peft_model = PeftModel.from_pretrained(model, adapter_dir).to(torch.bfloat16)
    started = time.perf_counter()
    merged = peft_model.merge_and_unload()
    merge_seconds = time.perf_counter() - started
    row = timed_writes("PEFT save_pretrained (bf16)", lambda p: merged.save_pretrained(p), work, repeats)
    return [("PEFT merge_and_unload (once)", merge_seconds, None), row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 135m config")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="model size (default 1b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    args = parser.parse_args()
    name = args.config or ("135m" if args.quick else "1b")
    started = time.perf_counter()
    base, weights = build_base(CONFIGS[name])
    adapter = random_adapter(base.module_shapes(), r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", seed=1)
    base.add_adapter(adapter, name="lora")
    t0 = time.perf_counter()
    report = base.merge("lora")
    rows = [("adapterhub merge (once)", time.perf_counter() - t0, None)]
    state = {k: v.contiguous() for k, v in quantized_state(base.model).items()}  # what a bf16 export writes
    params = sum(t.numel() for t in state.values())
    print(f"config {name}: {params / 1e9:.2f} B parameters, bf16, r={RANK} all-linear, {report.modules} modules merged "
          f"(built in {t0 - started:.0f} s); threads={torch.get_num_threads()}, repeats={args.repeats}, "
          f"writing under {args.dir or tempfile.gettempdir()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.dir) as tmp:
        work = Path(tmp)
        rows.append(timed_writes("safetensors save_file (bf16)", lambda p: save_state(state, p), work, args.repeats))
        rows.append(timed_writes("export bf16", lambda p: base.export(p, dtype="bfloat16"), work, args.repeats))
        rows.append(timed_writes("export nf4", lambda p: base.export(p, quantize="nf4"), work, args.repeats))
        if not args.no_peft:
            try:
                adapter.save_peft_dir(work / "adapter")
                rows += peft_rows(CONFIGS[name], weights, work / "adapter", work, args.repeats)
            except ImportError:
                print("(peft / transformers not installed: no PEFT comparison)")
    baseline = rows[1][1]
    print(f"{'writer':<32} {'seconds':>8} {'bytes':>14} {'MB/s':>8} {'÷ save_file':>12}")
    for writer, seconds, nbytes in rows:
        size = f"{nbytes:>14,} {nbytes / 1e6 / seconds:>8.0f}" if nbytes else f"{'-':>14} {'-':>8}"
        ratio = f"{seconds / baseline:>12.2f}" if nbytes else f"{'-':>12}"
        print(f"{writer:<32} {seconds:>8.2f} {size} {ratio}")


if __name__ == "__main__":
    main()
