"""Runtime commands: generate (parse → library → format). torch is imported only when a command runs."""

from __future__ import annotations

import click

from adapterhub.cli import main
from adapterhub.cli.options import adapter_dtype_option, allow_base_mismatch_option, emit, open_registry, output_options, registry_option


@main.command("generate")
@click.argument("prompt")
@click.option("--base", "-b", "base_name", default="tiny", show_default=True,
              help="Base model: 'tiny' (embedded), a Hugging Face checkpoint dir, or a hub id in the local HF cache.")
@click.option("--adapter", "-a", default=None, metavar="REF|DIR|HF",
              help="Adapter: a registry ref (task@v3, task:prod, task), a PEFT dir written as a path (./dir, "
                   "/abs/dir, ~/dir), or hf://org/name[@revision] (imported into the registry on first use). "
                   "Default: the base alone.")
@registry_option
@click.option("--max-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
@click.option("--quantize", default="nf4", show_default=True, metavar="FORMAT",
              help="Storage of the base's decoder linears: a 4-bit format (nf4, fp4) or 'none' (dense bf16).")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Compute dtype (and the dtype of a dense base with --quantize none).")
@click.option("--token-ids", "is_token_ids", is_flag=True,
              help="PROMPT is comma-separated token ids (for a base without tokenizer.json; prints the ids).")
@adapter_dtype_option
@allow_base_mismatch_option
@output_options
def generate(prompt, base_name, adapter, registry, max_tokens, temperature, top_p, seed, quantize, dtype, is_token_ids,
             adapter_dtype, allow_base_mismatch, as_json, quiet):
    """Complete PROMPT with a base model, optionally through one adapter.

    \b
    adapterhub generate "Once upon a time"
    adapterhub generate --adapter sql:prod "SELECT name FROM"
    adapterhub generate --base ./llama-dir --adapter ./my-peft-adapter -n 32 "Hello"
    adapterhub generate --base ./no-tokenizer-dir --token-ids 1,15043,29892 --json
    adapterhub generate --base ./llama-dir --adapter hf://org/sql-lora "SELECT"
    adapterhub generate --base ./llama-dir --quantize none --dtype float32 "Hello"   # exact fp32, as transformers
    """
    from adapterhub.adapter import adapter_source
    from adapterhub.registry.hub import is_hub_url, pull_through
    from adapterhub.runtime import load_base

    import torch

    if is_hub_url(adapter):  # imported once per commit, then read by its manifest digest
        pinned = pull_through(open_registry(registry, reading=False), adapter)
        source = f"{pinned.task}@{pinned.digest}"
    else:
        source = adapter_source(adapter) if adapter else None  # a bad or ambiguous name fails before the model loads
    tokens = _token_ids(prompt) if is_token_ids else None
    reg = open_registry(registry) if isinstance(source, str) else None
    base = load_base(base_name, quantize=None if quantize == "none" else quantize, compute_dtype=getattr(torch, dtype),
                     adapter_dtype=adapter_dtype)
    name = None
    if source is not None:
        name = base.add_adapter(reg.load(source) if reg else source, name=adapter,
                                allow_base_mismatch=allow_base_mismatch)
    out = base.generate([tokens if tokens is not None else prompt], adapters=[name], max_new_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed)[0]
    text = out.text if out.text is not None else ",".join(map(str, out.token_ids))
    emit(as_json, quiet, {"base": base_name, "adapter": adapter, "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                          "completion_tokens": out.completion_tokens}, text, [text])


def _token_ids(prompt: str) -> list[int]:
    try:
        ids = [int(part) for part in prompt.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise click.BadParameter(f"{prompt!r} is not a comma-separated list of token ids, e.g. 1,15043,29892",
                                 param_hint="PROMPT (with --token-ids)")
    return ids
