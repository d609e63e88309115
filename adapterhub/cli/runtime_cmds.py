"""Runtime commands: generate (parse → library → format). torch is imported only when a command runs."""

from __future__ import annotations

import click

from adapterhub.cli import main
from adapterhub.cli.options import registry_option


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
def generate(prompt, base_name, adapter, registry, max_tokens, temperature, top_p, seed, quantize):
    """Complete PROMPT with a base model, optionally through one adapter.

    \b
    adapterhub generate "Once upon a time"
    adapterhub generate --adapter sql:prod "SELECT name FROM"
    adapterhub generate --base ./llama-dir --adapter ./my-peft-adapter -n 32 "Hello"
    adapterhub generate --base ./llama-dir --adapter hf://org/sql-lora "SELECT"
    """
    from adapterhub.adapter import adapter_source
    from adapterhub.registry import Registry
    from adapterhub.registry.hub import is_hub_url, pull_through
    from adapterhub.runtime import load_base

    if is_hub_url(adapter):  # imported once per commit, then read by its manifest digest
        pinned = pull_through(Registry(registry), adapter)
        source = f"{pinned.task}@{pinned.digest}"
    else:
        source = adapter_source(adapter) if adapter else None  # a bad or ambiguous name fails before the model loads
    base = load_base(base_name, quantize=None if quantize == "none" else quantize)
    name = None
    if source is not None:
        is_ref = isinstance(source, str)
        name = base.add_adapter(Registry(registry).load(source) if is_ref else source, name=adapter)
    out = base.generate([prompt], adapters=[name], max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        seed=seed)[0]
    click.echo(out.text)
