"""Content identity: ``sha256:<hex>`` digests of raw (uncompressed) bytes."""

from __future__ import annotations

import hashlib
import re

from adapterhub.errors import IntegrityError

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class Digest(str):
    """A validated ``sha256:<64 lowercase hex>`` string (OCI descriptor digest syntax)."""

    def __new__(cls, value: str) -> Digest:
        if not isinstance(value, str) or not _DIGEST.fullmatch(value):
            raise IntegrityError(f"{value!r} is not a digest; expected 'sha256:' followed by 64 lowercase hex digits")
        return super().__new__(cls, value)

    @property
    def hex(self) -> str:
        return self[len("sha256:"):]

    @classmethod
    def of(cls, data: bytes | memoryview) -> Digest:
        return cls("sha256:" + hashlib.sha256(data).hexdigest())


def is_digest(value: str) -> bool:
    return bool(_DIGEST.fullmatch(value))


def verify(data: bytes, expected: str, what: str) -> None:
    """Raise IntegrityError naming `what` when `data` does not hash to `expected`."""
    actual = Digest.of(data)
    if actual != expected:
        raise IntegrityError(f"{what}: content hashes to {actual}, expected {expected}; the copy is corrupt "
                             "(run 'adapterhub verify', then re-push or re-copy it from a good registry)")
