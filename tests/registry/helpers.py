"""Helpers for the registry tests: tiny Llama-shaped adapters (semantics §6.3 example shapes)."""

from __future__ import annotations

from adapterhub.adapter import random_adapter

# hidden 64, 2 layers, v_proj 2 KV heads x 16.
SHAPES = {f"model.layers.{i}.self_attn.{p}": (64 if p == "q_proj" else 32, 64)
          for i in range(2) for p in ("q_proj", "v_proj")}


def make_adapter(seed: int = 0, use_dora: bool = False, dtype: str = "float32", r: int = 8):
    return random_adapter(SHAPES, r=r, use_dora=use_dora, seed=seed, dtype=dtype)


def blob_files(root):
    return sorted(p.name for p in (root / "blobs" / "sha256").iterdir())


def store_tree(root) -> dict[str, bytes | None]:
    """{relative path: file bytes, or None for a directory} of everything under `root` except lock files
    (a lock file is created empty by any command that locks; it holds no data). {} if `root` is missing."""
    import os
    from pathlib import Path
    root = Path(root)
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            tree[str((base / name).relative_to(root))] = None
        for name in filenames:
            path = base / name
            if path.parent.name != "locks" and path.is_file() and not path.is_symlink():  # not a FIFO either
                tree[str(path.relative_to(root))] = path.read_bytes()
    return tree


def cli(*args):
    """(exit code, stdout and stderr together) of `adapterhub ARGS` through click's CliRunner.

    CliRunner catches an exception the command let escape; its traceback is appended to the output, as a
    terminal would show it, so a test can assert there is none.
    """
    import traceback

    from click.testing import CliRunner

    from adapterhub.cli import main
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "".join(traceback.format_exception(result.exception))
    return result.exit_code, output


def assert_one_line_error(code: int, output: str, *names: str) -> None:
    """A CLI failure: non-zero exit, one line of output, no traceback, naming each of `names`."""
    assert code != 0, output
    assert "Traceback" not in output and output.strip().count("\n") == 0, output
    for name in names:
        assert name in output, (name, output)


def zstd_rle_frame(declared: int, blocks: int, block: int = 1 << 17) -> bytes:
    """A zstd frame declaring `declared` content bytes and holding `blocks` RLE blocks of `block` zero bytes,
    4 bytes each (RFC 8878 Sec. 3.1.1): 64 KB of it decompresses to 2 GiB, the shape of a zstd bomb."""
    import struct
    descriptor, window = 0xC0, (17 - 10) << 3  # 8-byte content size, a 128 KiB window
    out = [struct.pack("<IBBQ", 0xFD2FB528, descriptor, window, declared)]
    for i in range(blocks):
        out.append(((block << 3) | (1 << 1) | (i == blocks - 1)).to_bytes(3, "little") + b"\0")
    return b"".join(out)


def blob_file(frame: bytes, raw_size: int, width: int = 1) -> bytes:
    """A stored blob file: adapterhub's header frame declaring `raw_size`, then `frame` (blobs.py layout)."""
    from adapterhub.registry import blobs
    return blobs._HEADER.pack(blobs._SKIPPABLE_MAGIC, 16, blobs._MAGIC, width, raw_size) + frame


def safetensors_bytes(header, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or raw JSON bytes) and a data section; `length` overrides
    the 8-byte header length, to write one that lies."""
    import json
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + body
