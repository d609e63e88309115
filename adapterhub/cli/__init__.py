"""The ``adapterhub`` command line: thin click commands (parse → call the library → format).

Commands live one area per module (pip-tools style) and register themselves on :data:`main`:
``registry_cmds`` (push, pull, ls, show, log, tag, diff, rm, gc, verify, copy),
``runtime_cmds`` (generate), ``serve_cmds`` (serve, demo).

Errors from :mod:`adapterhub.errors` become a one-line message and exit code 1, here and only here.
"""

from __future__ import annotations

import click

from adapterhub import __version__
from adapterhub.errors import AdapterHubError


class _Group(click.Group):
    """Converts every AdapterHubError raised by a command into a one-line ClickException."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdapterHubError as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterhub")
def main() -> None:
    """Keep, ship and serve LoRA / QLoRA / DoRA adapters.

    \b
    adapterhub demo                       # the whole product on the embedded tiny model
    adapterhub push ./my-adapter sql      # → sql@v1
    adapterhub serve --port 8000          # OpenAI-style API, one base, many adapters
    """


# Importing the modules registers their commands on `main`.
from adapterhub.cli import registry_cmds, runtime_cmds, serve_cmds  # noqa: E402,F401
