"""CLI commands of this area; they register themselves on `adapterhub.cli.main`."""

from __future__ import annotations
