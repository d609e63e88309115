"""Merge and combine commands: merge (adapters folded into a base, written as a Hugging Face checkpoint) and
combine (adapters into a new registry version that records its lineage). Parse → library → format; torch
is imported only when a command runs.

Reading the sources and combining them is composition (the registry never imports the runtime, the runtime
never opens a registry), so it lives here as small helpers shared by both commands rather than in either
library.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

from adapterhub.adapter import Adapter, adapter_source
from adapterhub.cli import main
from adapterhub.cli.options import (allow_base_mismatch_option, emit, open_registry, output_options, registry_option,
                                    show_progress, warn)
from adapterhub.errors import ConfigError
from adapterhub.fsio import check_destination, replace_dir_with
from adapterhub.registry import Registry

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype -> the export dtype
METHODS = "linear, cat, ties, dare, dare_ties, magnitude_prune"  # runtime/adapters/combine.py checks them
# Lineage annotation keys. org.adapterhub.* is reserved for the store's own keys (manifest.annotation_strings),
# so the lineage uses its own prefix; every value is a string (lists as JSON text).
LINEAGE = "combine."
DARE = ("dare", "dare_ties")  # the methods that draw at random, so the seed is part of their lineage

weights_option = click.option("--weights", "-w", default=None, metavar="W1,W2,...",
                              help="One weight per REF, comma-separated (default: 1/N each, the average).")
method_option = click.option("--method", "-m", default=None, metavar="METHOD",
                             help=f"How to combine: {METHODS} (default: linear).")
density_option = click.option("--density", default=None, type=float,
                              help="Fraction kept by ties / dare / dare_ties / magnitude_prune.")
seed_option = click.option("--seed", default=0, show_default=True, type=int,
                           help="Seed of dare's random drops (recorded, so the result can be made again).")


@dataclass(frozen=True)
class _Source:
    label: str  # "task@vN" for a registry ref, the absolute path of a PEFT dir
    digest: str | None  # the manifest digest of a ref; None for a directory
    adapter: Adapter

    def to_json(self) -> dict:
        return {"ref": self.label, "digest": self.digest}


@main.command("merge")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--base", "-b", "base_name", required=True,
              help="Base model: 'tiny' (embedded), a Hugging Face checkpoint dir (dense or 4-bit), or a hub id "
                   "in the local HF cache.")
@click.option("--output", "-o", "output", required=True, type=click.Path(),
              help="Checkpoint directory to write (must be missing or empty, unless --force).")
@weights_option
@method_option
@density_option
@seed_option
@click.option("--dtype", default="bf16", show_default=True, metavar="DTYPE",
              help="dtype of the written weights: bf16, fp16 or fp32.")
@click.option("--quantize", default=None, metavar="FORMAT",
              help="Write the decoder linears in a 4-bit format (nf4, fp4), quantized once from the fp32 merge.")
@click.option("--shard-size", default="5GB", show_default=True,
              help="Largest safetensors shard (decimal units, as transformers' max_shard_size).")
@click.option("--force", "-f", is_flag=True,
              help="Replace a non-empty output directory as a whole (every file in it is removed).")
@output_options
@allow_base_mismatch_option
@registry_option
def merge(refs, base_name, output, weights, method, density, seed, dtype, quantize, shard_size, force, as_json,
          quiet, allow_base_mismatch, registry):
    """Merge adapters into a base and write it as a Hugging Face checkpoint that transformers loads.

    Several REFs (or any of --weights / --method / --density) are combined first; one REF alone is merged
    as is. The merge is computed in fp32 and rounded, or quantized, once (docs/semantics.md §4.6).

    \b
    adapterhub merge sql:prod --base ./llama-3.2-1b -o ./llama-sql
    adapterhub merge sql@v3 chat@v1 --weights 0.7,0.3 --base ./llama -o ./llama-mix --quantize nf4
    adapterhub merge ./my-peft-adapter --base ./llama -o ./out --dtype fp16 --force --json
    """
    import torch

    from adapterhub.runtime import load_base
    from adapterhub.runtime.export import parse_size
    from adapterhub.runtime.quant import formats

    dest = Path(os.path.abspath(output))
    check_destination(dest, force)  # everything cheap is checked before the base is read
    export_dtype = _export_dtype(dtype)
    if quantize is not None and quantize not in formats.QUANTIZED:
        raise ConfigError(f"--quantize {quantize!r} is not a 4-bit format; use one of {list(formats.QUANTIZED)}")
    parse_size(shard_size)
    sources = _read_sources(registry, refs)
    is_combined = len(sources) > 1 or weights is not None or method is not None or density is not None
    adapter, params = (_combine(sources, weights, method, density, None, seed) if is_combined
                       else (sources[0].adapter, None))
    # fp32, dense: the merge is exact before export rounds it once; a 4-bit checkpoint loads as saved, and export
    # then recomputes the merge from its dequantized weights (never requantizing twice).
    base = load_base(base_name, quantize=None, compute_dtype=torch.float32, max_adapters=1)
    name = base.add_adapter(adapter, name=" + ".join(s.label for s in sources), allow_base_mismatch=allow_base_mismatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what counts is the written checkpoint's loss, printed below as one line
        report = base.merge(name)
        result = _export_replacing(base, dest, force, dtype=export_dtype, quantize=quantize, shard_size=shard_size,
                                   progress=show_progress(as_json, quiet))
    out = {**result.to_json(), "base": base_name, "sources": [s.to_json() for s in sources], "combine": params,
           "merge": {**asdict(report), "warning": report.warning}}
    total = sum(result.files.values())
    text = [f"merged {name} into {base_name}: {report.modules} modules; the written weights keep the "
            f"adapter's delta within {result.delta_error_max:.2e} (mean {result.delta_error_mean:.2e}, relative; "
            "docs/semantics.md §4.6)",
            f"wrote {result.path} ({result.quantize or result.dtype}, {total} bytes in {result.seconds:.1f} s)",
            *(f"  {file}  {size}" for file, size in result.files.items())]
    if result.warning and not (as_json or quiet):
        warn([result.warning])
    emit(as_json, quiet, out, text, ids=[str(result.path)])


@main.command("combine")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@weights_option
@method_option
@density_option
@click.option("--rank", default=None, type=int, help="Refactor the combination to this rank by truncated SVD.")
@seed_option
@click.option("--task", required=True, help="Task the result is pushed to, as its next version.")
@click.option("--tag", "-t", "tags", multiple=True, help="Also point this tag at the new version (repeatable).")
@output_options
@registry_option
def combine(refs, weights, method, density, rank, seed, task, tags, as_json, quiet, registry):
    """Combine adapters into the next version of TASK, recording its lineage in the manifest annotations.

    \b
    adapterhub combine sql@v3 chat@v1 --weights 0.7,0.3 --task sql-chat --tag prod   # → sql-chat@v1
    adapterhub combine a b c --method ties --density 0.5 --rank 16 --task abc --json
    adapterhub show sql-chat:prod     # note combine.sources = ["sql@v3", "chat@v1"], combine.weights, ...
    """
    sources = _read_sources(registry, refs)
    adapter, params = _combine(sources, weights, method, density, rank, seed)
    reg = Registry(registry)
    bases = {s.adapter.base for s in sources}  # sources on one recorded base make a combination on that base
    ref = reg.push(adapter, task, tags=tags, annotations=_lineage(sources, params),
                   base=bases.pop() if len(bases) == 1 else None)
    value = {"ref": str(ref), "digest": ref.digest, "annotations": dict(reg.manifest(ref).annotations)} if as_json else None
    emit(as_json, quiet, value, str(ref), ids=[str(ref)])


def _read_sources(registry: str | None, names) -> list[_Source]:
    """Each name as a registry ref or a PEFT dir (adapter.adapter_source's rule), read and checked; a ref is
    resolved once and read by its manifest digest, so the lineage names exactly what was combined. The
    registry is opened only if some name is a ref."""
    reg, sources = None, []
    for name in names:
        kind = adapter_source(name)
        if isinstance(kind, Path):
            sources.append(_Source(os.path.abspath(kind), None, Adapter.from_peft_dir(kind)))
            continue
        reg = reg or open_registry(registry)
        resolved = reg.resolve(kind)
        sources.append(_Source(str(resolved), resolved.digest, reg.load(f"{resolved.task}@{resolved.digest}")))
    return sources


def _combine(sources: list[_Source], weights: str | None, method: str | None, density: float | None,
             rank: int | None, seed: int):
    """(the combined Adapter, its parameters as JSON values): runtime.combine on the sources' adapters."""
    from adapterhub.runtime import combine as combine_adapters

    method = method or "linear"
    values = _weights(weights) if weights is not None else [1 / len(sources)] * len(sources)
    adapter = combine_adapters([s.adapter for s in sources], values, method, density=density, rank=rank, seed=seed)
    params = {"method": method, "weights": values, "density": density, "rank": rank,
              "seed": seed if method in DARE else None}
    return adapter, {key: value for key, value in params.items() if value is not None}


def _lineage(sources: list[_Source], params: dict) -> dict[str, str]:
    """Manifest annotations combine.<key>: the sources, their manifest digests (null for a directory) and the
    combine parameters, every value a string (lists and numbers as JSON text)."""
    notes = {"sources": [s.label for s in sources], "digests": [s.digest for s in sources], **params}
    return {LINEAGE + key: value if isinstance(value, str) else json.dumps(value) for key, value in notes.items()}


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r} is not a comma-separated list of numbers; write e.g. 0.7,0.3") from None


def _export_dtype(dtype: str) -> str:
    if dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _export_replacing(base, dest: Path, force: bool, **options):
    """base.export(...) into `dest` as a whole (fsio.replace_dir_with): `dest` is never a half-written
    checkpoint, a non-empty one is replaced only with --force, and what a killed run left is cleaned next time."""
    results = []
    replace_dir_with(dest, lambda tmp: results.append(base.export(tmp, **options)), force=force)
    return replace(results[0], path=dest)
