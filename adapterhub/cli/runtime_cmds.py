"""Runtime commands: generate (parse → library → format). torch is imported only when a command runs."""

from __future__ import annotations

import click

from adapterhub.cli import main
from adapterhub.cli.options import registry_option


@main.command("generate")
@click.argument("prompt")
@click.option("--base", "-b", "base_name", default="tiny", show_default=True,
              help="Base model: 'tiny' (embedded), a Hugging Face checkpoint dir, or a hub id in the local HF cache.")
@click.option("--adapter", "-a", default=None, metavar="REF|DIR",
              help="Adapter: a registry ref (task@v3, task:prod, task) or a PEFT dir. Default: the base alone.")
@registry_option
@click.option("--max-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
@click.option("--quantize", default="nf4", show_default=True, type=click.Choice(["nf4", "none"]),
              help="Store the base's decoder linears in NF4, or keep them dense (bf16).")
def generate(prompt, base_name, adapter, registry, max_tokens, temperature, top_p, seed, quantize):
    """Complete PROMPT with a base model, optionally through one adapter.

    \b
    adapterhub generate "Once upon a time"
    adapterhub generate --adapter sql:prod "SELECT name FROM"
    adapterhub generate --base ./llama-dir --adapter ./my-peft-adapter -n 32 "Hello"
    """
    from adapterhub.runtime import load_base

    base = load_base(base_name, quantize=None if quantize == "none" else quantize)
    name = base.add_adapter(adapter, registry=registry) if adapter else None
    out = base.generate([prompt], adapters=[name], max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        seed=seed)[0]
    click.echo(out.text)
