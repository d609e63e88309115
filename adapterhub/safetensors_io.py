"""A small, exact safetensors codec over bytes (no torch, no safetensors package).

Format (safetensors README): an 8-byte little-endian unsigned header length N, then N bytes of JSON
``{key: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(offsets relative to the data section), then the raw little-endian tensor data.

Why not ``safetensors.numpy``: numpy has no bfloat16, so BF16 adapters could not be read without
converting them, and the registry must round-trip F32, F16 and BF16 tensors byte-identically (their
digests name them). Here a tensor is kept as its dtype code, shape and exact bytes (``RawTensor``);
BF16 is viewed as its uint16 bits and widened to float32 by a 16-bit shift.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from adapterhub.errors import AdapterFormatError

# safetensors dtype code -> (numpy dtype of the stored bits, bytes per element).
DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
# dtype name (numpy / torch spelling) -> safetensors dtype code.
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MAX_HEADER = 100 * 1024 * 1024  # a sanity bound: adapter headers are a few KB


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class RawTensor:
    """One tensor exactly as stored: safetensors dtype code, shape, little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)

    @classmethod
    def from_array(cls, array: np.ndarray, dtype: str | None = None) -> RawTensor:
        """From a float array; `dtype` ("F32", "F16", "BF16", "F64") converts first (BF16: round to nearest even)."""
        array = np.asarray(array)
        code = dtype or DTYPE_CODES.get(array.dtype.name)
        if code not in DTYPES:
            raise AdapterFormatError(f"dtype {array.dtype} is not a float dtype; use float32, float16 or bfloat16")
        if code == "BF16":
            bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
            stored = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        else:
            stored = np.ascontiguousarray(array, dtype=np.dtype(DTYPES[code][0]).newbyteorder("<"))
        return cls(code, tuple(int(n) for n in array.shape), stored.tobytes())

    def stored(self) -> np.ndarray:
        """The stored elements (BF16 as uint16 bits), read-only, shaped."""
        return np.frombuffer(self.data, dtype=np.dtype(DTYPES[self.dtype][0]).newbyteorder("<")).reshape(self.shape)

    def to_float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return (self.stored().astype(np.uint32) << 16).view(np.float32)
        return self.stored().astype(np.float32)


def read_safetensors(data: bytes, source: str = "safetensors") -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Parse a safetensors file's bytes into {key: RawTensor} and its metadata.

    Checked as the safetensors library checks (its ``Metadata::validate``): the header is UTF-8 JSON
    without duplicate keys, each tensor's byte range matches its dtype and shape, and the ranges tile the
    data section exactly: none overlaps another, and no byte belongs to no tensor. Errors name the tensors.
    """
    if len(data) < 8:
        raise AdapterFormatError(f"{source}: {len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER:
        raise AdapterFormatError(f"{source}: header length {n} is over the {_MAX_HEADER}-byte limit of safetensors; "
                                 "the file is corrupt or not a safetensors file")
    if n > len(data) - 8:
        raise AdapterFormatError(f"{source}: header length {n} runs past the end of the {len(data)}-byte file; "
                                 "the file is truncated or corrupt, save it again")
    header = _header(data[8:8 + n], source)
    metadata = _metadata(header.pop("__metadata__", None), source)
    body = memoryview(data)[8 + n:]
    entries = {key: _entry(key, entry, len(body), source) for key, entry in header.items()}
    _check_tiling(entries, len(body), source)
    tensors = {key: RawTensor(dtype, shape, bytes(body[begin:end])) for key, (dtype, shape, begin, end) in entries.items()}
    return tensors, metadata


def _header(text: bytes, source: str) -> dict[str, Any]:
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=lambda pairs: _unique(pairs, source))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{source}: safetensors header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{source}: safetensors header must be a JSON object")
    return header


def _unique(pairs: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """A JSON object without repeated keys: the spec disallows them, and json.loads would keep the last one,
    so two readers could disagree about which tensor a key names."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise AdapterFormatError(f"{source}: the safetensors header names {repeated} more than once; keys must be "
                                 "unique, save the file again")
    return out


def _metadata(metadata: Any, source: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterFormatError(f"{source}: __metadata__ must map strings to strings; got {metadata!r:.80}")
    return dict(metadata)


def _entry(key: str, entry: Any, body_size: int, source: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, its byte range checked against dtype and shape."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError):
        raise AdapterFormatError(f"{source}: tensor {key!r} has a malformed header entry {entry!r:.120}") from None
    if dtype not in DTYPES:
        raise AdapterFormatError(f"{source}: tensor {key!r} has dtype {dtype}; adapter tensors must be one of "
                                 f"{sorted(DTYPES)} (cast them to float32)")
    if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
        raise AdapterFormatError(f"{source}: tensor {key!r} has a malformed shape {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise AdapterFormatError(f"{source}: tensor {key!r} has data_offsets {offsets!r:.80}; expected [begin, end]")
    (begin, end), expected = offsets, math.prod(shape) * DTYPES[dtype][1]
    if not (begin <= end <= body_size and end - begin == expected):
        raise AdapterFormatError(f"{source}: tensor {key!r} {dtype}{shape} needs {expected} bytes but its "
                                 f"data_offsets are [{begin}, {end}] in a {body_size}-byte buffer")
    return dtype, tuple(shape), begin, end


def _check_tiling(entries: Mapping[str, tuple], body_size: int, source: str) -> None:
    """Sorted by offset, each tensor starts where the previous one ends and the last ends the buffer
    (safetensors README: no overlapping addresses; its validate() also refuses holes and trailing bytes)."""
    cursor, previous = 0, None
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < cursor:
            raise AdapterFormatError(f"{source}: tensors {previous!r} and {key!r} overlap (bytes [{begin}, "
                                     f"{min(cursor, end)}) belong to both); the file is corrupt, save it again")
        if begin > cursor:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise AdapterFormatError(f"{source}: bytes [{cursor}, {begin}) {after} belong to no tensor (next: "
                                     f"{key!r}); safetensors files have no holes, the file is corrupt")
        cursor, previous = end, key
    if cursor != body_size:
        after = f"after the last tensor {previous!r}" if previous else "in a file with no tensors"
        raise AdapterFormatError(f"{source}: {body_size - cursor} trailing bytes {after} belong to no tensor; "
                                 "the file is corrupt or was appended to, save it again")


def write_safetensors(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize to safetensors bytes: keys sorted, header padded with spaces to 8 bytes (as safetensors does)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        size = len(tensors[key].data)
        header[key] = {"dtype": tensors[key].dtype, "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *(tensors[key].data for key in sorted(tensors))])
