"""The ``adapterhub`` command line: thin click commands (parse → call the library → format).

Commands live one area per module (pip-tools style) and register themselves on :data:`main`:
``registry_cmds`` (push, pull, ls, show, log, tag, diff, rm, gc, verify, copy),
``runtime_cmds`` (generate), ``merge_cmds`` (merge, combine), ``serve_cmds`` (serve, demo),
``train_cmds`` (train, plan).

Errors from :mod:`adapterhub.errors` become a one-line message and exit code 1, here and only here.
"""

from __future__ import annotations

import warnings

import click

from adapterhub import __version__
from adapterhub.errors import AdapterHubError


class _Group(click.Group):
    """Converts every AdapterHubError raised by a command into a one-line ClickException.

    An OSError that reaches here (a path the library did not anticipate: a store directory you cannot read)
    becomes one line too, naming the path, rather than a traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except AdapterHubError as error:
            raise click.ClickException(f"{type(error).__name__}: {_one_line(error)}") from error
        except OSError as error:
            raise click.ClickException(f"{type(error).__name__}: {_one_line(error)}; check that path and its "
                                       "permissions") from error


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (a base mismatch let through, a lossy merge) as one 'warning: …' line on stderr."""
    click.echo(f"warning: {_one_line(message)}", err=True)


def _one_line(error: Exception) -> str:
    """Messages hold user values (paths, refs) that may contain newlines; the CLI prints exactly one line."""
    return " ".join(str(error).splitlines())


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
from adapterhub.cli import merge_cmds, registry_cmds, runtime_cmds, serve_cmds, train_cmds  # noqa: E402,F401
