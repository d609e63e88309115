"""Options shared by several commands."""

from __future__ import annotations

import click

registry_option = click.option(
    "--registry",
    "-r",
    "registry",
    default=None,
    metavar="LOCATION",
    help="Registry path or oci://host:port/namespace URL (default: $ADAPTERHUB_HOME, else ~/.cache/adapterhub).",
)
