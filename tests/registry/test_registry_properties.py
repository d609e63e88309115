"""Property tests: blob codec, safetensors codec and ref syntax round-trip for any input."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub.adapter import RawTensor, read_safetensors, write_safetensors
from adapterhub.registry import blobs
from adapterhub.registry.refs import parse_ref

TASK = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
TAG = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True).filter(lambda t: t != "latest")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from([1, 2, 4, 8]))
def test_blob_codec_round_trips_any_bytes(raw, width):
    encoded = blobs.encode(raw, width)
    assert blobs.decode(encoded, "x") == raw
    assert blobs.unshuffle(blobs.shuffle(raw, width), width) == raw


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda k: k != "__metadata__"),
                       st.tuples(st.sampled_from(["F32", "F16", "BF16", "F64"]),
                                 st.lists(st.integers(0, 5), max_size=3)), max_size=5))
def test_safetensors_codec_round_trips(spec):
    rng = np.random.default_rng(0)
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    tensors = {k: RawTensor(d, tuple(s), rng.bytes(int(np.prod(s, dtype=int)) * sizes[d]))
               for k, (d, s) in spec.items()}
    assert read_safetensors(write_safetensors(tensors, {"format": "pt"})) == (tensors, {"format": "pt"})


@settings(max_examples=60, deadline=None)
@given(TASK, st.integers(1, 10 ** 6), TAG)
def test_ref_syntax_round_trips(task, version, tag):
    assert str(parse_ref(f"{task}@v{version}")) == f"{task}@v{version}"
    assert str(parse_ref(f"{task}:{tag}")) == f"{task}:{tag}"
    assert str(parse_ref(task)) == f"{task}:latest"
