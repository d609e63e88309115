"""`adapterhub serve` (the OpenAI-style server) and `adapterhub demo` (the whole product in one command)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from adapterhub.cli import main
from adapterhub.cli.options import adapter_dtype_option, allow_base_mismatch_option, open_registry, registry_option
from adapterhub.errors import ConfigError
from adapterhub.serve.limits import HttpLimits


def _name_ref_pairs(ctx, param, values) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, ref = value.partition("=")
        if not (sep and name and ref):
            raise click.BadParameter(f"{value!r} is not NAME=REF, e.g. sql=sql:prod or sql=./sql-lora")
        pairs.append((name, ref))
    return pairs


@main.command("serve")
@click.option("--base", "base_name", default="tiny", show_default=True,
              help="Base model: 'tiny' (embedded), an HF checkpoint dir, or a hub id from the local cache.")
@registry_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-adapters", default=16, show_default=True, type=click.IntRange(1),
              help="Adapter slots in the pool (LRU beyond that).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests waiting for a batch row before HTTP 429.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Rows decoded together (KV cache rows).")
@click.option("--max-seq", default=None, type=click.IntRange(2),
              help="Tokens per request (prompt + completion); default: the context length, at most 4096.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float32"]),
              help="Compute dtype. float32 makes a row's result independent of the batch it runs in.")
@click.option("--quantize", default="nf4", show_default=True, metavar="FORMAT",
              help="Storage of the base's decoder linears: a 4-bit format (nf4, fp4) or 'none' (dense, in --dtype). "
                   "A 4-bit checkpoint loads as saved.")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="The base's model id in the API (/v1/models, the 'model' field); default: --base as given.")
@click.option("--chat-template", "chat_template_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A Jinja chat template file, used instead of the tokenizer's (chat_template.jinja or "
                   "tokenizer_config.json).")
@click.option("--lora-modules", "lora_modules", multiple=True, metavar="NAME=REF", callback=_name_ref_pairs,
              help="Serve an adapter under a model name from the start (as vLLM's option): REF is a registry ref, a "
                   "PEFT directory path (./dir, /dir) or hf://org/name. Repeat it for several.")
@adapter_dtype_option
@click.option("--kv-cache-memory", default=None, metavar="SIZE",
              help="KV cache budget, e.g. 512MB, 2GiB: blocks of 16 tokens given to requests as tokens arrive; "
                   "requests wait (or are preempted and recomputed) when it is full. Default: 1/8 of the memory "
                   "available, at most the base's weight bytes, at least one request of --max-seq tokens.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
              help="Requests whose prompts start with the same full 16-token blocks, under the same adapter, share "
                   "those blocks' keys and values instead of recomputing them; freed blocks stay cached until the "
                   "budget needs them.")
@click.option("--max-body-bytes", default=HttpLimits.max_body_bytes, show_default=True, type=click.IntRange(1),
              help="Largest request body; bigger ones get HTTP 413 before they are read.")
@click.option("--header-timeout", default=HttpLimits.header_timeout_s, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client has to send a request's headers (then 408 and close).")
@click.option("--body-timeout", default=HttpLimits.body_timeout_s, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Seconds a client has to send a request's body (408).")
@click.option("--max-connections", default=HttpLimits.max_connections, show_default=True, type=click.IntRange(1),
              help="Open connections before new requests get HTTP 503.")
@allow_base_mismatch_option
@click.option("--allow-hub", is_flag=True,
              help="Let a request's model be hf://org/name[@revision]: imported into the registry on first use "
                   "(from the Hub, or the local HF cache with HF_HUB_OFFLINE=1), then pinned to that version.")
@click.option("--replicas", default=None, type=click.IntRange(1),
              help="Run N engine replicas on Ray Serve (pip install 'adapterhub[ray]'), routed by adapter.")
@click.option("--ray-address", default=None, metavar="auto|ray://HOST:PORT",
              help="The Ray cluster for --replicas / --autoscale (default: start a local Ray instance).")
@click.option("--autoscale", default=None, metavar="MIN,MAX",
              help="Let Ray Serve scale the engine replicas between MIN and MAX with the load.")
def serve(base_name: str, registry: str | None, host: str, port: int, max_adapters: int, max_queue: int,
          max_batch: int, max_seq: int | None, dtype: str, quantize: str, served_model_name: str | None,
          chat_template_file: Path | None, lora_modules: list[tuple[str, str]], adapter_dtype: str,
          kv_cache_memory: str | None, enable_prefix_caching: bool, max_body_bytes: int, header_timeout: float,
          body_timeout: float, max_connections: int, allow_base_mismatch: bool, allow_hub: bool, replicas: int | None,
          ray_address: str | None, autoscale: str | None) -> None:
    """Serve one base and any adapter of a registry over an OpenAI-style HTTP API.

    \b
    adapterhub serve --port 8000
    curl localhost:8000/v1/completions -d '{"model": "sql:prod", "prompt": "SELECT", "max_tokens": 16}'
    ADAPTERHUB_API_KEY=s3cret adapterhub serve --host 0.0.0.0   # reachable from the network: set a key
    adapterhub serve --base ./SmolLM2-135M-Instruct --served-model-name smol --lora-modules sql=sql:prod
    adapterhub serve --replicas 2 --registry oci://registry:5000/team   # on Ray Serve (local Ray by default)
    """
    from adapterhub.runtime import load_base
    from adapterhub.runtime.export import parse_size
    from adapterhub.runtime.model.chat_template import ChatTemplate
    from adapterhub.serve import server
    from adapterhub.serve.api import create_app
    from adapterhub.serve.engine import Engine, EngineConfig

    import torch

    warning = server.exposure_warning(host, os.environ.get("ADAPTERHUB_API_KEY"))
    if warning:
        click.echo(warning, err=True)
    limits = HttpLimits(max_body_bytes=max_body_bytes, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                        max_connections=max_connections)
    if replicas is not None or ray_address is not None or autoscale is not None:
        _serve_on_ray(dict(base=base_name, registry=registry, dtype=dtype, replicas=replicas or 1,
                           max_adapters=max_adapters, max_batch=max_batch, max_queue=max_queue, max_seq=max_seq,
                           allow_base_mismatch=allow_base_mismatch, allow_hub=allow_hub, autoscale=autoscale),
                      ray_address, host, port, limits, _single_process_only(
                          quantize=quantize != "nf4", served_model_name=served_model_name,
                          chat_template=chat_template_file, lora_modules=lora_modules,
                          adapter_dtype=adapter_dtype != "auto", kv_cache_memory=kv_cache_memory,
                          no_enable_prefix_caching=not enable_prefix_caching))
        return
    kv_bytes = None
    if kv_cache_memory is not None:
        try:
            kv_bytes = parse_size(kv_cache_memory)
        except ConfigError:
            raise ConfigError(f"--kv-cache-memory {kv_cache_memory!r} is not a size; write e.g. 512MB, 2GiB "
                              "or a number of bytes") from None
    template = None
    if chat_template_file is not None:  # checked before the model loads, like the port
        template = chat_template_file.read_text(encoding="utf-8")
        ChatTemplate(template, {}, origin=str(chat_template_file))
    reg = open_registry(registry)
    sock = server.bind_socket(host, port)  # a busy port fails now, not after loading the model
    engine = None
    try:
        base = load_base(base_name, quantize=None if quantize == "none" else quantize,
                         compute_dtype=getattr(torch, dtype), max_adapters=max_adapters, adapter_dtype=adapter_dtype)
        if base.tokenizer is None:
            raise ConfigError(f"base {base_name!r} has no tokenizer.json; the server takes text, so it needs one: save "
                              "it beside the weights (transformers: AutoTokenizer.from_pretrained(...)"
                              ".save_pretrained(dir))")
        if template is not None:
            base.tokenizer = base.tokenizer.with_chat_template(template)
        config = EngineConfig(max_batch=max_batch, max_queue=max_queue, max_seq=max_seq, base_name=served_model_name,
                              allow_base_mismatch=allow_base_mismatch, allow_hub=allow_hub, kv_cache_memory=kv_bytes,
                              enable_prefix_caching=enable_prefix_caching)
        engine = Engine(base, reg, config)
        for name, source in lora_modules:
            engine.add_named_adapter(name, source).result()
        click.echo(f"adapterhub: serving base '{engine.base_name}' ({dtype}, {quantize}) on http://{host}:{port} "
                   f"(max_batch={max_batch}, max_adapters={max_adapters}, max_queue={max_queue}, "
                   f"max_seq={engine.max_seq})")
        click.echo(f"adapterhub: {engine.memory_summary()}")
        server.run_server(create_app(engine, limits=limits), host, port, limits, sock)
    finally:
        sock.close()
        if engine is not None:
            engine.close()


def _single_process_only(**given: object) -> list[str]:
    """The serve options given (truthy) that the Ray Serve deployment does not take (yet)."""
    return ["--" + name.replace("_", "-") for name, value in given.items() if value]


def _serve_on_ray(args: dict, address: str | None, host: str, port: int, limits: HttpLimits,
                  unsupported: list[str]) -> None:
    """`serve --replicas/--autoscale/--ray-address`: the same API from engine replicas on Ray Serve."""
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} apply to the single-process server; on Ray Serve "
                          "(--replicas / --autoscale / --ray-address) leave them out")
    try:
        from ray import serve as ray_serve

        from adapterhub.serve.ray import RayServeConfig, start
    except ImportError as error:
        raise ConfigError(f"--replicas, --autoscale and --ray-address run on Ray Serve, which is not installed "
                          f"({error}); pip install 'adapterhub[ray]'") from None
    config = RayServeConfig.from_args(args)
    count = f"{config.autoscale[0]} to {config.autoscale[1]}" if config.autoscale else str(config.replicas)
    click.echo(f"adapterhub: starting {count} engine replica(s) of base '{config.base}' on "
               f"{address or 'a local Ray instance'}...")
    url = start(config, address, host, port, limits=limits)
    click.echo(f"adapterhub: serving on {url} (Ray Serve, application 'adapterhub'; Ctrl-C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()


@main.command("demo")
@click.option("--quick", is_flag=True, help="Fewer rows and tokens (a few seconds).")
def demo(quick: bool) -> None:
    """Show the whole product on the embedded tiny model: adapters → registry → one mixed batch.

    \b
    adapterhub demo
    """
    from adapterhub.serve.demo import run_demo

    run_demo(click.echo, is_quick=quick)
