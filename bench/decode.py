"""Decode speed: adapterhub against llama.cpp and transformers on random Llamas of real sizes, in one process.

    python -m bench.decode [--model 135m|1b|both] [--tokens 64] [--quick] [--workdir DIR]

Models, built by transformers from their configs with random weights (nothing is downloaded) and saved
in bf16 with the byte tokenizer, cached under `--workdir` with their GGUFs and adapters:
- 135m: SmolLM2-135M's config (hidden 576, intermediate 1536, 30 layers, 9 / 3 heads, Dh 64, vocab 49152,
  tied embeddings, rope_theta 100000);
- 1b: Llama-3.2-1B's (hidden 2048, intermediate 8192, 16 layers, 32 / 8 heads, Dh 64, vocab 128256 (the
  full one), tied, rope_theta 500000, without its llama3 rope scaling: speed does not depend on it).

llama.cpp (llama-cpp-python, `pip install -e ".[bench]"`) runs GGUFs written from the same weights
(bench/gguf_export.py): decoder linears in Q4_0 and in Q4_1, the token embedding and the tied head in
F16 (the head reads the same bytes per token as adapterhub's bf16 lm_head; llama-quantize's default would
store it in Q6_K, 0.41 of those bytes). A sanity check first: llama.cpp on an F16 GGUF against transformers
in fp32, the logits at every position of a 32-token prompt (they must match) and 8 greedy tokens (shown);
on the 135m, the same GGUF with the q / k rows left in HF's order is the control the check must reject.

Measured, all with 2 threads (torch.set_num_threads(2); llama.cpp n_threads = n_threads_batch = 2):
a 32-token prompt per stream, then `--tokens` greedy decode steps (decode tokens/s: streams x steps / the
steps' wall time, median of the repeats), and the prefill of one 512-token prompt (tokens/s, median).
- llama.cpp Q4_0 and Q4_1, 1 stream and 8 streams (8 sequences in one llama_batch per step);
- adapterhub NF4 and bf16 bases through `Base.prefill` / `Base.decode`: 1 stream; 8 streams of the base;
  8 streams each with its own LoRA adapter (r=16 on all 7 linears, non-zero lora_B, PEFT dirs added with
  `Base.add_adapter`);
- transformers bf16 `generate` (greedy, 1 stream; decode rate from generate(N + 1) - generate(1)), and
  the same with one PEFT adapter.

Goals: adapterhub 1 stream >= 1.0x llama.cpp Q4_1's 1 stream on the 135M and >= 1.2x on the 1B; 8
mixed-adapter streams >= 5x adapterhub's 1 stream.

Figures with the one-call CPU decode step and the tiled head GEMV (AMD EPYC (Zen 4), 2 cores, torch 2.13.0,
llama-cpp-python 0.3.36; 135m: `--tokens 64`, median of 3, 2.3 minutes; 1b: `--tokens 32 --repeats 2`, 6.4
minutes; the machine's speed drifts by 10-20 % over minutes), decode tokens/s by streams (8 mixed: each its own
adapter); prefill: one 512-token prompt, tokens/s; in parentheses an earlier run of the same bench on the same
kind of machine with one Python call per fused op:

                              135m: 1            8        8 mixed  prefill    1b: 1         8       8 mixed  prefill
    llama.cpp         Q4_0  182.0 (160.8) 354.7 (374.3)         -      910  27.7 (29.1) 62.7 (59.9)        -   132
    llama.cpp         Q4_1  128.9 (110.4) 205.9 (202.6)         -      343  17.6 (15.8) 29.9 (28.5)        -    37
    adapterhub        NF4   157.8 (92.4)  392.0 (327.0) 315.2 (235.5)  885  24.3 (16.9) 85.1 (60.6) 74.4 (55.0) 180
    adapterhub        bf16   33.3 (34.5)  187.3 (177.9) 146.1 (135.0)  942   6.4 (5.9)  42.8 (34.7) 36.0 (32.0) 173
    transformers      bf16       23.2            -              -     1021      5.2         -            -      178
    + PEFT, 1 adapter bf16       18.3            -              -      689      4.5         -            -       86

adapterhub NF4 1 stream / llama.cpp Q4_1 1 stream: 1.22x (135m), 1.38x (1b); 8 streams / 1 stream: 2.48x,
3.50x; 8 mixed / 1 stream: 2.00x, 3.06x (bf16: 4.39x, 5.63x). Sanity: max |Δlogit| 0.0047 (135m) and 0.0146
(1b) of the logits' std, every prompt argmax equal; the control 0.2997.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=256,
                 eos_token_id=257),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=256,
               eos_token_id=257),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, STREAMS, PROMPT, LONG_PROMPT, SANITY_TOKENS, THREADS = 16, 8, 32, 512, 8, 2
# max |Δlogit| / std allowed: llama.cpp's F16 (weights and activations) vs fp32 measured 0.005 (135M) and
# 0.015 (1B); the control with the q / k rows in HF's order 0.30.
SANITY_ERROR = 0.05
GGUF_FORMATS = ("f16", "q4_0", "q4_1")


# --- models, adapters and GGUFs (built once per workdir) ---------------------------------------------


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(Dout, Din) of every decoder linear by HF path, as Base.module_shapes() reports them."""
    D, F, Dh = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    per_layer = {"self_attn.q_proj": (H * Dh, D), "self_attn.k_proj": (Hkv * Dh, D), "self_attn.v_proj": (Hkv * Dh, D),
                 "self_attn.o_proj": (D, H * Dh), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    return {f"model.layers.{i}.{m}": s for i in range(config["num_hidden_layers"]) for m, s in per_layer.items()}


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The saved bf16 checkpoint as float32 numpy arrays, by HF name."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(path / "model.safetensors").items()}


def build(key: str, workdir: Path, with_gguf: bool = True) -> Path:
    """The model dir for `key`: checkpoint, tokenizer, adapters/a{i} and model-{format}.gguf (built when missing)."""
    import transformers

    from adapterhub.adapter import random_adapter
    from adapterhub.runtime.model.tiny import byte_tokenizer

    config = MODELS[key]
    path = workdir / f"llama-{key}"
    if not (path / "model.safetensors").is_file():
        print(f"building the {key} model in {path} ...", flush=True)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        model.to(torch.bfloat16).save_pretrained(path)
        byte_tokenizer().save(path)
        del model
    for i in range(STREAMS):
        if not (path / f"adapters/a{i}/adapter_config.json").is_file():
            random_adapter(module_shapes(config), r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                           seed=i).save_peft_dir(path / f"adapters/a{i}")
    todo = [(fmt, True) for fmt in GGUF_FORMATS if not (path / f"model-{fmt}.gguf").is_file()]
    if key == "135m" and not (path / "control-f16.gguf").is_file():
        todo.append(("f16", False))
    if todo and with_gguf:
        from bench import gguf_export

        weights, saved = load_weights(path), json.loads((path / "config.json").read_text())
        for fmt, is_interleaved in todo:
            name = f"model-{fmt}.gguf" if is_interleaved else f"control-{fmt}.gguf"
            print(f"writing {name} ...", flush=True)
            gguf_export.write_gguf(path / name, weights, saved, fmt, interleave_rotary=is_interleaved)
    return path


# --- sanity check: llama.cpp's F16 GGUF against transformers in fp32 -------------------------------------


def compare_with_transformers(path: Path, gguf_paths: dict[str, Path], prompt: list[int]) -> dict:
    """{label: (max |Δlogit| / std of the logits over the prompt, prompt positions whose argmax agrees,
    leading greedy tokens that agree, transformers' top-1 minus top-2 logit where greedy first differs)}."""
    import transformers

    from bench.llama_cpp_runner import LlamaCpp

    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        reference = hf(ids).logits[0].numpy()  # (T, V)
        generated = hf.generate(ids, max_new_tokens=SANITY_TOKENS, min_new_tokens=SANITY_TOKENS, do_sample=False,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = generated.sequences[0, len(prompt):].tolist()
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in generated.scores)]
    del hf
    out = {}
    for label, gguf_path in gguf_paths.items():
        runner = LlamaCpp(gguf_path, n_threads=THREADS, n_seq=1, n_ctx_seq=256)
        try:
            logits = runner.prefill([prompt], all_logits=True)  # (T, V)
            runner.reset()
            greedy = runner.greedy([prompt], SANITY_TOKENS - 1)[0].tolist()
        finally:
            runner.close()
        error = float(np.abs(logits - reference).max() / reference.std())
        agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
        leading = next((i for i, (a, b) in enumerate(zip(greedy, tokens)) if a != b), len(tokens))
        out[label] = (error, agree, leading, margins[leading] if leading < len(tokens) else None)
    return out


def sanity_check(path: Path, prompt: list[int]) -> None:
    """Passes when llama.cpp's F16 logits match transformers' at every prompt position (the greedy run is
    shown: a random model's near ties can flip under F16 activations, and then the continuations part)."""
    paths = {"F16 GGUF": path / "model-f16.gguf"}
    if (path / "control-f16.gguf").is_file():
        paths["control: q / k rows in HF's order"] = path / "control-f16.gguf"
    results = compare_with_transformers(path, paths, prompt)
    for label, (error, agree, leading, margin) in results.items():
        where = "" if margin is None else f" (transformers' top-2 margin at the first difference: {margin:.4f})"
        print(f"sanity, llama.cpp {label} vs transformers fp32: max |Δlogit| = {error:.4f} x the logits' std, "
              f"argmax agrees at {agree}/{len(prompt)} prompt positions, greedy agrees for the first "
              f"{leading}/{SANITY_TOKENS} tokens{where}", flush=True)
    error, agree, _, _ = results["F16 GGUF"]
    if not (error < SANITY_ERROR and agree >= 0.9 * len(prompt)):
        raise SystemExit("sanity check failed: llama.cpp's logits differ from transformers' (GGUF layout?)")
    control = [e for label, (e, *_) in results.items() if label.startswith("control")]
    if control and control[0] < SANITY_ERROR:
        raise SystemExit("sanity check has no power: the control GGUF passes it too")


# --- measurements ---------------------------------------------------------------------------------------


def median_of(fn, repeats: int) -> float:
    """Median of fn()'s returned seconds over `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def time_llama_cpp(path: Path, fmt: str, prompts, long_prompt, steps: int, repeats: int) -> list[tuple]:
    from bench.llama_cpp_runner import LlamaCpp

    runner = LlamaCpp(path / f"model-{fmt}.gguf", n_threads=THREADS, n_seq=STREAMS,
                      n_ctx_seq=max(LONG_PROMPT, PROMPT + steps) + 16)
    try:
        def prefill_long() -> float:
            runner.reset()
            start = time.perf_counter()
            runner.prefill([long_prompt])
            return time.perf_counter() - start

        def decode(S: int) -> float:
            runner.reset()
            first = runner.prefill(prompts[:S])
            start = time.perf_counter()
            runner.greedy(prompts[:S], steps, first)
            return time.perf_counter() - start

        prefill_tps = LONG_PROMPT / median_of(prefill_long, repeats)
        return [("llama.cpp", fmt.upper(), f"{S}", S * steps / median_of(lambda: decode(S), repeats),
                 prefill_tps if S == 1 else None) for S in (1, STREAMS)]
    finally:
        runner.close()


def time_adapterhub(path: Path, quantize: str | None, prompts, long_prompt, steps: int, repeats: int) -> list[tuple]:
    from adapterhub.runtime.base import load_base

    base = load_base(path, quantize=quantize, compute_dtype=torch.bfloat16)
    names = [base.add_adapter(path / f"adapters/a{i}", name=f"a{i}") for i in range(STREAMS)]
    fmt = "NF4" if quantize else "bf16"

    def prefill_long() -> float:
        cache = base.new_cache(max_batch=1, max_seq=LONG_PROMPT)
        start = time.perf_counter()
        base.prefill(cache, [0], [long_prompt], None)
        return time.perf_counter() - start

    def decode(S: int, adapters: list[str] | None) -> float:
        cache = base.new_cache(max_batch=S, max_seq=PROMPT + steps + 1)
        ids = base.pool.acquire(adapters) if adapters else None
        try:
            logits = base.prefill(cache, list(range(S)), prompts[:S], ids)
            rows = torch.arange(S)
            start = time.perf_counter()
            for _ in range(steps):
                logits = base.decode(cache, rows, logits.argmax(-1), ids)
            logits.argmax(-1).tolist()  # the last token on the host, as a server would send it
            return time.perf_counter() - start
        finally:
            if ids is not None:
                base.pool.release(ids)

    prefill_tps = LONG_PROMPT / median_of(prefill_long, repeats)
    rows = []
    for streams, S, adapters in (("1", 1, None), (f"{STREAMS}", STREAMS, None), (f"{STREAMS} mixed", STREAMS, names)):
        rows.append(("adapterhub", fmt, streams, S * steps / median_of(lambda: decode(S, adapters), repeats),
                     prefill_tps if S == 1 else None))
    return rows


def time_transformers(path: Path, prompts, long_prompt, steps: int, repeats: int, with_peft: bool) -> list[tuple]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, long_ids = torch.tensor(prompts[:1]), torch.tensor([long_prompt])
    rows = []
    for label in ("transformers", "transformers + PEFT (1 adapter)")[: 1 + with_peft]:
        if label != "transformers":
            from peft import PeftModel

            # Injects LoRA layers into `model` itself: so the plain model is measured first.
            model = PeftModel.from_pretrained(model, path / "adapters/a0").eval()

        def generate(n: int, m=model) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

        def prefill_long(m=model) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                m(long_ids, logits_to_keep=1)
            return time.perf_counter() - start

        decode_s = median_of(lambda: generate(steps + 1), repeats) - median_of(lambda: generate(1), repeats)
        rows.append((label, "bf16", "1", steps / decode_s, LONG_PROMPT / median_of(prefill_long, repeats)))
    return rows


# --- report ---------------------------------------------------------------------------------------------


def print_table(key: str, rows: list[tuple], steps: int, repeats: int) -> None:
    print(f"\n{key}: {THREADS} threads, {PROMPT}-token prompts, {steps} greedy decode steps, median of {repeats}")
    print(f"| implementation | format | streams | decode tok/s | prefill {LONG_PROMPT} tok/s |")
    print("|---|---|---:|---:|---:|")
    for name, fmt, streams, decode_tps, prefill_tps in rows:
        prefill = f"{prefill_tps:.0f}" if prefill_tps else "-"
        print(f"| {name} | {fmt} | {streams} | {decode_tps:.1f} | {prefill} |")
    speed = {(name, fmt, streams): tps for name, fmt, streams, tps, _ in rows}
    cpp = speed.get(("llama.cpp", "Q4_1", "1"))
    goal = 1.0 if key == "135m" else 1.2
    for fmt in ("NF4", "bf16"):
        one = speed[("adapterhub", fmt, "1")]
        if cpp:
            print(f"adapterhub {fmt} 1 stream / llama.cpp Q4_1 1 stream: {one / cpp:.2f}x (goal >= {goal}x)")
        print(f"adapterhub {fmt} {STREAMS} streams / 1 stream: base {speed[('adapterhub', fmt, str(STREAMS))] / one:.2f}x, "
              f"mixed adapters {speed[('adapterhub', fmt, f'{STREAMS} mixed')] / one:.2f}x (goal >= 5x)")
    for fmt in ("Q4_0", "Q4_1"):
        if ("llama.cpp", fmt, "1") in speed:
            print(f"llama.cpp {fmt} {STREAMS} streams / 1 stream: "
                  f"{speed[('llama.cpp', fmt, str(STREAMS))] / speed[('llama.cpp', fmt, '1')]:.2f}x")


def run(key: str, workdir: Path, steps: int, repeats: int, with_peft: bool) -> None:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401

        has_llama_cpp = True
    except ImportError:
        has_llama_cpp = False
        print("(llama-cpp-python or gguf is not installed: no llama.cpp rows; pip install -e \".[bench]\")")
    path = build(key, workdir, with_gguf=has_llama_cpp)
    V = MODELS[key]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, V, PROMPT).tolist() for _ in range(STREAMS)]
    long_prompt = rng.integers(3, V, LONG_PROMPT).tolist()
    rows = []
    if has_llama_cpp:
        sanity_check(path, prompts[0])
        for fmt in ("q4_0", "q4_1"):
            rows += time_llama_cpp(path, fmt, prompts, long_prompt, steps, repeats)
            print(f"  measured llama.cpp {fmt}", flush=True)
    for quantize in ("nf4", None):
        rows += time_adapterhub(path, quantize, prompts, long_prompt, steps, repeats)
        print(f"  measured adapterhub {quantize or 'bf16'}", flush=True)
    rows += time_transformers(path, prompts, long_prompt, steps, repeats, with_peft)
    print_table(key, rows, steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("135m", "1b", "both"), default="135m")
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 decode steps, 1 repeat, no PEFT row")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "adapterhub-bench-decode",
                        help="where the built models, adapters and GGUFs are cached")
    args = parser.parse_args()
    steps, repeats = (16, 1) if args.quick else (args.tokens, args.repeats)
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for key in (("135m", "1b") if args.model == "both" else (args.model,)):
        run(key, args.workdir, steps, repeats, with_peft=not args.quick)


if __name__ == "__main__":
    main()
