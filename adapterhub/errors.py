"""One error hierarchy for adapterhub.

Every error a user can trigger derives from :class:`AdapterHubError`. Messages say what is wrong,
with the values involved, and what to do next (style: huggingface_hub ``errors.py``). Where a
builtin exception type is the natural one, classes inherit from it too, so ``except ValueError``
and ``except FileNotFoundError`` keep working (hf_hub's dual inheritance).

The CLI converts :class:`AdapterHubError` into a one-line message and a non-zero exit in one
place (``adapterhub.cli``); the HTTP API maps the classes to status codes via ``http_status``.
"""

from __future__ import annotations

import dataclasses


class AdapterHubError(Exception):
    """Base class of every adapterhub error."""

    http_status: int = 500


# --- input files and configs -------------------------------------------------------------------


class ConfigError(AdapterHubError, ValueError):
    """A configuration (adapter_config.json, config.json, CLI/HTTP parameters) is malformed."""

    http_status = 400


class AdapterFormatError(AdapterHubError, ValueError):
    """An adapter directory or its tensors are malformed (missing/extra/mis-shaped/NaN/pickle)."""

    http_status = 400


class IncompatibleAdapterError(AdapterHubError, ValueError):
    """An adapter does not fit the base model (unknown module, shape mismatch, fingerprint)."""

    http_status = 422


class ModelLoadError(AdapterHubError, ValueError):
    """A base model checkpoint cannot be loaded (missing files, unsupported architecture)."""

    http_status = 400


class QuantizationError(AdapterHubError, ValueError):
    """Invalid input to NF4 quantization / dequantization (blocksize, dtype, state dict)."""

    http_status = 400


class KernelArgumentError(AdapterHubError, ValueError):
    """Arguments to a compiled runtime kernel break its contract (dtype, device, layout, shape): a bug in
    the caller, not in user input, hence http_status 500."""


# --- registry ----------------------------------------------------------------------------------


class RegistryError(AdapterHubError):
    """Base class of store / ref / remote errors."""


class InvalidNameError(RegistryError, ValueError):
    """A task, tag or ref string is not allowed (path separators, '..', control characters)."""

    http_status = 400


class RefNotFoundError(RegistryError, LookupError):
    """A ref (task@vN, task:tag, task@sha256:...) does not exist in the registry."""

    http_status = 404


class BlobNotFoundError(RegistryError, FileNotFoundError):
    """A blob named by a manifest or a ref is missing from the store."""

    http_status = 404


class IntegrityError(RegistryError):
    """Stored bytes do not match their digest (corruption, truncation, oversize frames)."""


class FormatVersionError(RegistryError):
    """The on-disk store was written by an incompatible format version."""


class LockTimeoutError(RegistryError, TimeoutError):
    """A registry lock could not be acquired in time."""

    http_status = 503


class RemoteError(RegistryError):
    """A remote (OCI distribution) registry refused or failed a request."""

    http_status = 502


# --- runtime / serving -------------------------------------------------------------------------


class AdapterNotLoadedError(AdapterHubError, LookupError):
    """A forward or generate call names an adapter that is not in the pool."""

    http_status = 404


class CapacityError(AdapterHubError, RuntimeError):
    """No free slot: every adapter slot is in use by a batch in flight."""

    http_status = 429


class QueueFullError(AdapterHubError, RuntimeError):
    """The serving queue is at its bound; retry later."""

    http_status = 429


class RequestError(AdapterHubError, ValueError):
    """An HTTP / generation request is invalid (bad parameters, prompt too long)."""

    http_status = 400


class AuthError(RequestError):
    """An HTTP request lacks the server's API key (``Authorization: Bearer <ADAPTERHUB_API_KEY>``) or has
    a wrong one."""

    http_status = 401


class MergeError(AdapterHubError, ValueError):
    """Merging or combining adapters failed (non-finite merged weights, bad combine method/density)."""

    http_status = 400


class PayloadTooLargeError(RequestError):
    """An HTTP request body is over the server's limit (``serve --max-body-bytes``)."""

    http_status = 413


class RequestTimeoutError(RequestError):
    """An HTTP client sent its request body too slowly (``serve --body-timeout``)."""

    http_status = 408


class ReplicaUnavailableError(AdapterHubError, RuntimeError):
    """The replica serving a request stopped (its process died) before the answer was complete, or no replica
    could be reached; the request can be sent again (``serve --replicas``)."""

    http_status = 503


def check_known_keys(config_class, mapping, what: str) -> None:
    """ConfigError naming every key of `mapping` that is not a field of the dataclass `config_class`
    (a settings file is read whole, so a misspelt key never silently keeps a default)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; known: {sorted(known)}")
