"""A corpus of malformed inputs a user or a disk can produce, each refused cleanly.

Every case must raise exactly one `AdapterHubError` subclass (the one listed) whose message names the
object at fault (file, tensor, blob, field), leave the store byte for byte as it was (no temp file left
either), write no destination, and, through the CLI, exit 1 with one line and no traceback.

PEFT directories are pushed; store files are corrupted, then pulled; crafted configs (regex bombs among
them) are pushed. The last tests check the selector regex engine against `re.fullmatch`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub import Registry
from adapterhub.adapter import PEFT_DEFAULTS, AdapterConfig
from adapterhub.errors import (
    AdapterFormatError, AdapterHubError, BlobNotFoundError, ConfigError, FormatVersionError, IntegrityError,
)
from adapterhub.module_regex import ModuleRegex
from adapterhub.registry.blobs import BlobStore
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import canonical_json
from tests.registry.helpers import (
    assert_one_line_error, blob_file, cli, make_adapter, safetensors_bytes, store_tree, zstd_rle_frame,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"

# --- PEFT directories ---------------------------------------------------------------------------


def _config(src: Path, **changes) -> None:
    config = json.loads((src / CONFIG).read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (src / CONFIG).write_text(json.dumps(config))


def _weights(src: Path) -> tuple[dict, bytes]:
    data = (src / WEIGHTS).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(src: Path, edit) -> None:
    """Rewrite the safetensors file: `edit(header, body)` returns (header or raw JSON bytes, body)."""
    header, body = edit(*_weights(src))
    (src / WEIGHTS).write_bytes(safetensors_bytes(header, body))


def _tensors(src: Path, **arrays) -> None:
    """Replace / add tensors by key (keyword names use '__' for '.'), writing a well-formed file."""
    from adapterhub.safetensors_io import RawTensor, read_safetensors, write_safetensors
    tensors, _ = read_safetensors((src / WEIGHTS).read_bytes())
    for key, array in arrays.items():
        key = key.replace("__", ".")
        if array is None:
            del tensors[key]
        else:
            tensors[key] = RawTensor.from_array(np.asarray(array[0], dtype=np.float32), array[1])
    (src / WEIGHTS).write_bytes(write_safetensors(tensors, {"format": "pt"}))


def _shift(header: dict, key: str, delta: int) -> dict:
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + delta, end + delta]
    return header


def _second(header: dict) -> str:
    """The key whose data comes second in the file."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]


def _overlap(header, body):
    return _shift(header, _second(header), -4), body


def _gap(header, body):
    for key in header:
        if key != "__metadata__":
            _shift(header, key, 8)
    return header, bytes(8) + body


def _duplicate(header, body):
    text = json.dumps(header)
    entry = json.dumps({Q_A: header[Q_A]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode(), body


def _offsets(key, value):
    def edit(header, body):
        header[key]["data_offsets"] = value
        return header, body
    return edit


def _header_entry(key, **fields):
    def edit(header, body):
        header[key] = {**header[key], **fields} if fields else 5
        return header, body
    return edit


def _raw(data: bytes):
    return lambda src: (src / WEIGHTS).write_bytes(data)


def _length(value):
    """Make the 8-byte header length lie: `value(n, file size)` is the new one."""
    def mutate(src):
        data = (src / WEIGHTS).read_bytes()
        n = int.from_bytes(data[:8], "little")
        (src / WEIGHTS).write_bytes(value(n, len(data)).to_bytes(8, "little") + data[8:])
    return mutate


def _pickle_only(src):
    (src / WEIGHTS).unlink()
    (src / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


def _weights_dir(src):
    (src / WEIGHTS).unlink()
    (src / WEIGHTS).mkdir()


def _nan(dtype):
    def mutate(src):
        array = np.full((8, 64), 0.5, np.float32)
        array[3, 5] = np.nan if dtype == "F32" else np.inf
        _tensors(src, **{Q_A.replace(".", "__"): (array, dtype)})
    return mutate


PEFT_CASES = {
    # adapter_config.json
    "config missing": (lambda s: (s / CONFIG).unlink(), AdapterFormatError, CONFIG),
    "config not JSON": (lambda s: (s / CONFIG).write_text("{r: 8"), AdapterFormatError, CONFIG),
    "config not UTF-8": (lambda s: (s / CONFIG).write_bytes(b'{"r": "\xff"}'), AdapterFormatError, CONFIG),
    "config a list": (lambda s: (s / CONFIG).write_text("[]"), ConfigError, "must be a JSON object"),
    "r missing": (lambda s: _config(s, r=...), ConfigError, "'r'"),
    "r a string": (lambda s: _config(s, r="8"), ConfigError, "r must be a positive integer; got '8'"),
    "r zero": (lambda s: _config(s, r=0), ConfigError, "r must be a positive integer; got 0"),
    "r a bool": (lambda s: _config(s, r=True), ConfigError, "r must be a positive integer; got True"),
    "r huge": (lambda s: _config(s, r=10**12), AdapterFormatError, "r=1000000000000"),
    "lora_alpha NaN": (lambda s: (s / CONFIG).write_text((s / CONFIG).read_text().replace(
        '"lora_alpha": 16', '"lora_alpha": NaN')), ConfigError, "lora_alpha must be a finite number; got nan"),
    "lora_alpha Infinity": (lambda s: (s / CONFIG).write_text((s / CONFIG).read_text().replace(
        '"lora_alpha": 16', '"lora_alpha": -Infinity')), ConfigError, "lora_alpha must be a finite number"),
    "lora_alpha a string": (lambda s: _config(s, lora_alpha="16"), ConfigError, "lora_alpha"),
    "peft_type prefix tuning": (lambda s: _config(s, peft_type="PREFIX_TUNING"), ConfigError, "PREFIX_TUNING"),
    "use_dora a string": (lambda s: _config(s, use_dora="yes"), ConfigError, "use_dora must be true or false"),
    "target_modules a number": (lambda s: _config(s, target_modules=5), ConfigError, "target_modules"),
    "target_modules bad regex": (lambda s: _config(s, target_modules="(q_proj"), ConfigError, "target_modules"),
    "target_modules backreference": (lambda s: _config(s, target_modules=r"(q)\1_proj"), ConfigError,
                                     "target_modules"),
    "target_modules huge repeat": (lambda s: _config(s, target_modules="a{100000}"), ConfigError,
                                   "target_modules"),
    "target_modules 5000 characters": (lambda s: _config(s, target_modules="q" * 5000), ConfigError,
                                       "target_modules is a 5000-character regex"),
    "target_modules nested quantifier": (lambda s: (_config(s, target_modules=r"(a+)+$"), _tensors(s, **{
        "base_model__model__" + "a" * 32 + "!__lora_A__weight": (np.ones((8, 64)), "F32")})), AdapterFormatError,
        "does not select"),  # backtracking takes 2**32 steps on that module name
    "target_modules polynomial bomb": (lambda s: _config(s, target_modules=r"(.*a){25}"), AdapterFormatError,
                                       "does not select"),
    "exclude_modules nested quantifier": (lambda s: _config(s, exclude_modules=r"(.*)+q_proj"),
                                          AdapterFormatError, "q_proj"),
    "rank_pattern bad regex key": (lambda s: _config(s, rank_pattern={"(q": 4}), ConfigError, "rank_pattern"),
    "rank_pattern zero rank": (lambda s: _config(s, rank_pattern={"q_proj": 0}), ConfigError, "rank_pattern"),
    "rank_pattern other rank": (lambda s: _config(s, rank_pattern={"q_proj": 4}), AdapterFormatError,
                                "q_proj.lora_A.weight"),
    "layers_pattern with a repeat": (lambda s: _config(s, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                                                       layers_pattern="(layers)+"), ConfigError, "layers_pattern"),
    "modules_to_save": (lambda s: _config(s, modules_to_save=["lm_head"]), ConfigError, "modules_to_save"),
    "bias all": (lambda s: _config(s, bias="all"), ConfigError, "bias='all'"),
    "lora_bias": (lambda s: _config(s, lora_bias=True), ConfigError, "lora_bias"),
    "layers_to_transform a string": (lambda s: _config(s, layers_to_transform="0"), ConfigError,
                                     "layers_to_transform"),
    # which files are there
    "pickle only": (_pickle_only, AdapterFormatError, "adapter_model.bin"),
    "no weights file": (lambda s: (s / WEIGHTS).unlink(), AdapterFormatError, WEIGHTS),
    "weights file a directory": (_weights_dir, AdapterFormatError, WEIGHTS),
    # tensor values, dtypes, shapes, keys
    "NaN in a tensor": (_nan("F32"), AdapterFormatError, Q_A),
    "Inf in an F16 tensor": (_nan("F16"), AdapterFormatError, Q_A),
    "integer dtype": (lambda s: _rewrite(s, _header_entry(Q_A, dtype="I32")), AdapterFormatError,
                      f"tensor '{Q_A}' has dtype I32"),
    "lora_A of another rank": (lambda s: _tensors(s, **{Q_A.replace(".", "__"): (np.ones((4, 64)), "F32")}),
                               AdapterFormatError, Q_A),
    "lora_A one-dimensional": (lambda s: _tensors(s, **{Q_A.replace(".", "__"): (np.ones(64), "F32")}),
                               AdapterFormatError, Q_A),
    "lora_B of another rank": (lambda s: _tensors(s, **{Q_B.replace(".", "__"): (np.ones((64, 4)), "F32")}),
                               AdapterFormatError, Q_B),
    "lora_B missing": (lambda s: _tensors(s, **{Q_B.replace(".", "__"): None}), AdapterFormatError, Q_B),
    "extra key": (lambda s: _tensors(s, **{"extra__weight": (np.ones(2), "F32")}), AdapterFormatError,
                  "'extra.weight'"),
    "tensor for an untargeted module": (
        lambda s: _tensors(s, **{"base_model__model__model__layers__0__mlp__up_proj__lora_A__weight":
                                 (np.ones((8, 64)), "F32")}), AdapterFormatError, "mlp.up_proj"),
    "DoRA magnitude without use_dora": (
        lambda s: _tensors(s, **{"base_model__model__model__layers__0__self_attn__q_proj__lora_magnitude_vector":
                                 (np.ones(64), "F32")}), AdapterFormatError, "lora_magnitude_vector"),
    "use_dora without magnitudes": (lambda s: _config(s, use_dora=True), AdapterFormatError, "lora_magnitude_vector"),
    "no tensors": (_raw(safetensors_bytes({})), AdapterFormatError, "no tensors"),
    # the safetensors container
    "weights truncated": (lambda s: (s / WEIGHTS).write_bytes((s / WEIGHTS).read_bytes()[:-100]),
                          AdapterFormatError, WEIGHTS),
    "weights 5 bytes": (_raw(b"\x08\x00\x00\x00\x00"), AdapterFormatError, "too short"),
    "header length beyond the limit": (_length(lambda n, size: 1 << 40), AdapterFormatError, "over the"),
    "header length beyond the file": (_length(lambda n, size: size - 7), AdapterFormatError, "runs past the end"),
    "header length too short": (_length(lambda n, size: n - 20), AdapterFormatError, "not valid UTF-8 JSON"),
    "header not JSON": (_raw(safetensors_bytes(b"{not json}")), AdapterFormatError, "not valid UTF-8 JSON"),
    "header not UTF-8": (_raw(safetensors_bytes(b'{"\xff": 1}')), AdapterFormatError, "not valid UTF-8 JSON"),
    "header a list": (_raw(safetensors_bytes(b"[]")), AdapterFormatError, "must be a JSON object"),
    "overlapping data_offsets": (lambda s: _rewrite(s, _overlap), AdapterFormatError, "overlap"),
    "two tensors on one range": (lambda s: _rewrite(s, lambda h, b: (_shift(h, _second(h), -len(b) // 8), b)),
                                 AdapterFormatError, "overlap"),
    "hole before the first tensor": (lambda s: _rewrite(s, _gap), AdapterFormatError, "belong to no tensor"),
    "trailing bytes": (lambda s: _rewrite(s, lambda h, b: (h, b + bytes(16))), AdapterFormatError,
                       "16 trailing bytes"),
    "duplicate key": (lambda s: _rewrite(s, _duplicate), AdapterFormatError, f"names ['{Q_A}'] more than once"),
    "data_offsets reversed": (lambda s: _rewrite(s, _offsets(Q_A, [2048, 0])), AdapterFormatError, Q_A),
    "data_offsets out of bounds": (lambda s: _rewrite(s, _offsets(Q_A, [1 << 40, (1 << 40) + 2048])),
                                   AdapterFormatError, Q_A),
    "data_offsets three numbers": (lambda s: _rewrite(s, _offsets(Q_A, [0, 1024, 2048])), AdapterFormatError, Q_A),
    "data_offsets negative": (lambda s: _rewrite(s, _offsets(Q_A, [-2048, 0])), AdapterFormatError, Q_A),
    "shape negative": (lambda s: _rewrite(s, _header_entry(Q_A, shape=[-8, -64])), AdapterFormatError, Q_A),
    "shape of another size": (lambda s: _rewrite(s, _header_entry(Q_A, shape=[8, 63])), AdapterFormatError, Q_A),
    "header entry not an object": (lambda s: _rewrite(s, _header_entry(Q_A)), AdapterFormatError, Q_A),
    "metadata not strings": (lambda s: _rewrite(s, lambda h, b: ({**h, "__metadata__": {"format": 1}}, b)),
                             AdapterFormatError, "__metadata__"),
}


@pytest.fixture
def store(tmp_path):
    """A store holding sql@v1 (tagged prod), so 'nothing written' compares against a real tree."""
    registry = Registry(tmp_path / "store")
    registry.push(make_adapter(), "sql", tags=["prod"])
    return tmp_path / "store"


@pytest.fixture
def bad_dir(tmp_path, request):
    src = make_adapter().save_peft_dir(tmp_path / "src")
    _config(src, lora_alpha=16)
    request.param[0](src)
    return src, request.param[1], request.param[2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad_dir", list(PEFT_CASES.values()), ids=list(PEFT_CASES), indirect=True)
def test_a_malformed_peft_dir_is_refused_and_nothing_is_written(store, bad_dir):
    src, error, fragment = bad_dir
    before = store_tree(store)
    start = time.perf_counter()
    with pytest.raises(AdapterHubError) as caught:
        Registry(store).push(src, "sql")
    assert type(caught.value) is error, caught.value
    assert fragment in str(caught.value)
    assert store_tree(store) == before
    code, output = cli("push", src, "sql", "-r", store)
    assert_one_line_error(code, output, error.__name__, fragment)
    assert store_tree(store) == before
    assert time.perf_counter() - start < 10  # regex bombs included


# --- store files --------------------------------------------------------------------------------


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / Digest(digest).hex


def _manifest_dict(root: Path) -> dict:
    digest = (root / "refs" / "sql" / "versions" / "1").read_text().strip()
    return json.loads(BlobStore(root).get(digest))


def _publish(root: Path, raw: bytes, version: int = 2) -> str:
    """Store `raw` as a blob that hashes right and point sql@v<version> at it: a well-stored bad manifest."""
    digest, _ = BlobStore(root).put(raw)
    (root / "refs" / "sql" / "versions" / str(version)).write_text(digest + "\n")
    return f"sql@v{version}"


def _manifest_edit(edit, field_name: str):
    def mutate(root):
        d = _manifest_dict(root)
        d["annotations"]["org.adapterhub.version"] = "2"
        edit(d)
        return _publish(root, canonical_json(d)), field_name
    return mutate


def _config_edit(edit, field_name: str):
    def mutate(root):
        d = _manifest_dict(root)
        config = json.loads(BlobStore(root).get(d["config"]["digest"]))
        raw = edit(config)
        digest, _ = BlobStore(root).put(raw)
        d["config"].update(digest=digest, size=len(raw))
        d["annotations"]["org.adapterhub.version"] = "2"
        return _publish(root, canonical_json(d)), field_name
    return mutate


def _tensor_file(write):
    """Damage the file of the first tensor blob: `write(path, other_tensor_path) -> None`."""
    def mutate(root):
        layers = _manifest_dict(root)["layers"]
        path = _blob(root, layers[0]["digest"])
        write(path, _blob(root, layers[2]["digest"]), _blob(root, layers[1]["digest"]))
        return "sql@v1", layers[0]["digest"]
    return mutate


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def _whole_file(which: str):
    def mutate(root):
        d = _manifest_dict(root)
        digest = {"config": d["config"]["digest"],
                  "manifest": (root / "refs" / "sql" / "versions" / "1").read_text().strip()}[which]
        _flip(_blob(root, digest), -3)
        return "sql@v1", digest
    return mutate


def _layout(text: str, name: str):
    def mutate(root):
        (root / "adapterhub-layout").write_text(text)
        return "sql@v1", name
    return mutate


def _ref_file(path: str, ref: str):
    def mutate(root):
        (root / path).write_text("sha256:nothex\n")
        return ref, path
    return mutate


def _layer(**fields):
    def edit(d):
        d["layers"][0].update(fields)
    return edit


def _layer_note(key, value):
    def edit(d):
        d["layers"][0]["annotations"][key] = value
    return edit


STORE_CASES = {
    # blob files
    "tensor blob truncated": (_tensor_file(lambda p, o, s: p.write_bytes(p.read_bytes()[:-20])), IntegrityError),
    "tensor blob flipped byte": (_tensor_file(lambda p, o, s: _flip(p, -10)), IntegrityError),
    "tensor blob of another size": (_tensor_file(lambda p, o, s: p.write_bytes(o.read_bytes())), IntegrityError),
    "tensor blob of another tensor": (_tensor_file(lambda p, o, s: p.write_bytes(s.read_bytes())), IntegrityError),
    "tensor blob empty": (_tensor_file(lambda p, o, s: p.write_bytes(b"")), IntegrityError),
    "tensor blob zstd garbage": (_tensor_file(lambda p, o, s: p.write_bytes(p.read_bytes()[:24] + b"\x00" * 64)),
                                 IntegrityError),
    "tensor blob bad header": (_tensor_file(lambda p, o, s: p.write_bytes(b"AHB2" + p.read_bytes()[4:])),
                               IntegrityError),
    "tensor blob zstd bomb": (_tensor_file(lambda p, o, s: p.write_bytes(
        blob_file(zstd_rle_frame(2 << 30, 16384), 2 << 30, 4))), IntegrityError),
    "tensor blob frame without a size": (_tensor_file(lambda p, o, s: p.write_bytes(
        p.read_bytes()[:24] + __import__("zstandard").ZstdCompressor(write_content_size=False).compress(
            bytes(2048)))), IntegrityError),
    "tensor blob missing": (_tensor_file(lambda p, o, s: p.unlink()), BlobNotFoundError),
    "tensor blob a directory": (_tensor_file(lambda p, o, s: (p.unlink(), p.mkdir())), IntegrityError),
    "config blob flipped byte": (_whole_file("config"), IntegrityError),
    "manifest blob flipped byte": (_whole_file("manifest"), IntegrityError),
    # manifests that hash right but are malformed
    "manifest not JSON": (lambda r: (_publish(r, b"not json"), "not JSON"), IntegrityError),
    "manifest a list": (lambda r: (_publish(r, b"[]"), "the top level is a list"), IntegrityError),
    "manifest without layers": (_manifest_edit(lambda d: d.pop("layers"), "'layers' is missing"), IntegrityError),
    "manifest schemaVersion 3": (_manifest_edit(lambda d: d.update(schemaVersion=3), "'schemaVersion' is 3"),
                                 IntegrityError),
    "manifest unknown mediaType": (_manifest_edit(lambda d: d.update(mediaType="application/json"),
                                                  "'mediaType' is 'application/json'"), IntegrityError),
    "manifest unknown artifactType": (_manifest_edit(lambda d: d.update(artifactType="x/y"), "'artifactType'"),
                                      IntegrityError),
    "config descriptor unknown mediaType": (_manifest_edit(lambda d: d["config"].update(mediaType="x/y"),
                                                           "'config.mediaType'"), IntegrityError),
    "layer unknown mediaType": (_manifest_edit(_layer(mediaType="application/octet-stream"),
                                               "'layers[0].mediaType'"), IntegrityError),
    "layer size a string": (_manifest_edit(_layer(size="2048"), "'layers[0].size' is '2048'"), IntegrityError),
    "layer size negative": (_manifest_edit(_layer(size=-1), "'layers[0].size' is -1"), IntegrityError),
    "layer size disagrees with shape": (_manifest_edit(_layer(size=1024), "says size 1024"), IntegrityError),
    "layer digest malformed": (_manifest_edit(_layer(digest="md5:00"), "'layers[0].digest'"), IntegrityError),
    "layer dtype I8": (_manifest_edit(_layer_note("org.adapterhub.tensor.dtype", "I8"), "dtype 'I8'"),
                       IntegrityError),
    "layer shape not JSON": (_manifest_edit(_layer_note("org.adapterhub.tensor.shape", "[8,"), "shape '[8,'"),
                             IntegrityError),
    "layers out of order": (_manifest_edit(lambda d: d["layers"].reverse(), "not sorted"), IntegrityError),
    "version annotation not a number": (_manifest_edit(
        lambda d: d["annotations"].update({"org.adapterhub.version": "two"}), "'two'"), IntegrityError),
    "annotation not a string": (_manifest_edit(lambda d: d["annotations"].update({"eval.acc": 0.9}), "'eval.acc'"),
                                IntegrityError),
    "manifest claims another task": (_manifest_edit(
        lambda d: d["annotations"].update({"org.adapterhub.task": "chat"}), "belongs to task 'chat'"),
        IntegrityError),
    # config blobs that hash right but are malformed
    "config formatVersion 2": (_config_edit(lambda c: canonical_json({**c, "formatVersion": 2}), "formatVersion 2"),
                               IntegrityError),
    "config not JSON": (_config_edit(lambda c: b"{", "not JSON"), IntegrityError),
    "config peft_config not an object": (_config_edit(lambda c: canonical_json({**c, "peft_config": []}),
                                                      "'peft_config'"), IntegrityError),
    "config peft_config invalid": (_config_edit(lambda c: canonical_json(
        {**c, "peft_config": {**c["peft_config"], "r": -1}}), "r must be a positive integer"), ConfigError),
    # store-level files
    "layout formatVersion 9": (_layout('{"formatVersion": 9}', "formatVersion 9"), FormatVersionError),
    "layout not JSON": (_layout("formatVersion=1", "adapterhub-layout is malformed"), FormatVersionError),
    "version ref not a digest": (_ref_file("refs/sql/versions/1", "sql@v1"), IntegrityError),
    "tag ref not a digest": (_ref_file("refs/sql/tags/prod", "sql:prod"), IntegrityError),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mutate, error", list(STORE_CASES.values()), ids=list(STORE_CASES))
def test_a_corrupt_store_file_fails_the_pull_naming_it(store, tmp_path, mutate, error):
    ref, name = mutate(store)
    before = store_tree(store)
    dest = tmp_path / "out"
    with pytest.raises(AdapterHubError) as caught:
        Registry(store).pull(ref, dest)
    assert type(caught.value) is error, caught.value
    assert name in str(caught.value)
    code, output = cli("pull", ref, "-o", dest, "-r", store)
    assert_one_line_error(code, output, error.__name__, name)
    assert store_tree(store) == before
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no destination, no hidden temp directory


# --- crafted selector regexes -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_catastrophic_target_modules_regex_is_matched_in_linear_time():
    """`re.fullmatch(r"(a+)+$", "a" * 30 + "!")` takes minutes (it backtracks 2**30 ways)."""
    config = AdapterConfig.from_dict({**PEFT_DEFAULTS, "target_modules": r"(a+)+$"})
    start = time.perf_counter()
    assert config.matches("a" * 1000) and not config.matches("a" * 1000 + "!")
    assert not config.matches("model.layers." + "a" * 900 + ".q_proj")
    assert time.perf_counter() - start < 1


def test_an_overlong_module_name_is_refused_by_name():
    config = AdapterConfig.from_dict({**PEFT_DEFAULTS, "target_modules": r".*q_proj"})
    with pytest.raises(AdapterFormatError, match="is 5000 characters long"):
        config.matches("a" * 5000)


def test_normal_selectors_keep_peft_semantics():
    names = [f"model.layers.{i}.{p}" for i in (0, 1, 11) for p in ("self_attn.q_proj", "self_attn.v_proj",
                                                                  "mlp.down_proj", "self_attn.rotary_emb")]
    for pattern in [r".*\.(q_proj|v_proj)", r"model\.layers\.1\d?\.self_attn\.[qv]_proj", r"(?i).*Q_PROJ",
                    r"^(?!.*mlp).*proj$", r".*(?<=attn)\.q_proj", r".*\bq_proj\b", r".*layers\.(0|11)\..*"]:
        config = AdapterConfig.from_dict({**PEFT_DEFAULTS, "target_modules": pattern})
        assert [config.matches(n) for n in names] == [re.fullmatch(pattern, n) is not None for n in names], pattern
    layered = AdapterConfig.from_dict({**PEFT_DEFAULTS, "target_modules": ["q_proj"], "layers_to_transform": [1],
                                       "layers_pattern": "layers|h"})
    assert [layered.matches(n) for n in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj")] == \
        [True, False]


_ATOMS = st.sampled_from(["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", "_", r"\b", "^", "$", "(?i:A)",
                          "(?!a)", "(?=b)", "(?<=a)", "(?<!b)"])
_PATTERNS = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.tuples(inner, inner).map("".join),
    st.tuples(inner, inner).map(lambda ab: f"({ab[0]}|{ab[1]})"),
    st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?", "+?", "{0,2}?"])).map(
        lambda ar: f"(?:{ar[0]}){ar[1]}")), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_PATTERNS, st.lists(st.text("ab._1A\n", max_size=9), min_size=1, max_size=8))
def test_the_selector_engine_agrees_with_re_fullmatch(pattern, names):
    regex = ModuleRegex(pattern, "target_modules")
    assert [regex.fullmatch(n) for n in names] == [re.fullmatch(pattern, n) is not None for n in names]


def test_the_corpus_is_large():
    assert len(PEFT_CASES) >= 60 and len(STORE_CASES) >= 35
