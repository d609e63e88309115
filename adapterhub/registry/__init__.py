"""The content-addressed adapter registry (no torch): local stores and OCI remotes.

``from adapterhub import Registry``. On-disk format: docs/store-format.md.
"""

from adapterhub.registry.refs import RefSpec, ResolvedRef, parse_ref
from adapterhub.registry.registry import AdapterDiff, LogEntry, Registry

Ref = ResolvedRef

__all__ = ["Registry", "Ref", "ResolvedRef", "RefSpec", "parse_ref", "LogEntry", "AdapterDiff"]
