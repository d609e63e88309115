"""Options and output habits shared by every command (docs/cli.md): `--registry`, `--json`, `--quiet`.

A command computes one result and hands it to `emit` in three forms: the JSON value (`--json`, the shape
docs/cli.md documents), its identifiers (`--quiet`: one per line, e.g. the ref a push made) and the text
for people. Progress bars appear only when both stdout and stderr are terminals and neither flag is given.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import click

from adapterhub.registry import Registry

registry_option = click.option(
    "--registry",
    "-r",
    "registry",
    default=None,
    metavar="LOCATION",
    help="Registry path or oci://host:port/namespace URL (default: $ADAPTERHUB_HOME, else ~/.cache/adapterhub).",
)
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON document (its shape: docs/cli.md).")
quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="No progress bars and no text for people: only the result's identifiers, one a "
                                 "line (docs/cli.md).")
allow_base_mismatch_option = click.option(
    "--allow-base-mismatch", is_flag=True,
    help="Load adapters recorded against another base (a differing architecture, config or weights) with a "
         "warning instead of an error.")


adapter_dtype_option = click.option(
    "--adapter-dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32"]),
    help="Adapter weights and the LoRA term: 'auto' in the compute dtype (the fast compiled kernels), 'float32' "
         "inside a bf16 base as PEFT computes them (greedy output equal to PEFT's in bf16).")


def output_options(command):
    """--json and --quiet, in that order in --help."""
    return json_option(quiet_option(command))


def show_progress(as_json: bool, quiet: bool) -> bool:
    """Progress bars only for a person at a terminal: never with --json / --quiet, nor into a pipe or a file."""
    return not (as_json or quiet) and _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def emit(as_json: bool, quiet: bool, value: Any, text: str | Iterable[str] = (), ids: Iterable[str] = ()) -> None:
    """Print one result: `value` as JSON (sorted keys, indented) with --json; else `ids` with --quiet; else `text`."""
    if as_json:
        click.echo(json.dumps(value, indent=2, sort_keys=True))
        return
    for line in ids if quiet else ([text] if isinstance(text, str) else text):
        click.echo(line)


def warn(problems: Iterable[str]) -> None:
    """Problems that do not stop a command, on stderr (stdout stays the result, valid JSON with --json)."""
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)


def open_registry(location: str | None, *, reading: bool = True):
    """The registry a command names. A reading command refuses a local path given with -r that does not exist
    (a typo would otherwise list nothing); the default location may be new."""
    return Registry(location, must_exist=reading and location is not None)
