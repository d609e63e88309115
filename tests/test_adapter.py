"""adapterhub.adapter: PEFT config semantics (semantics §4.2, §6), exact tensor round trips, validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from adapterhub.adapter import (
    PEFT_DEFAULTS,
    Adapter,
    AdapterConfig,
    RawTensor,
    peft_key,
    random_adapter,
    read_safetensors,
    write_safetensors,
)
from adapterhub.errors import AdapterFormatError, ConfigError
from reference import lora as ref_lora
from reference.bf16 import round_to_bf16

# The tiny Llama of semantics §6.2: hidden 64, 2 layers, 2 KV heads x 16.
SHAPES = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128)}.items()}
Q0 = "model.layers.0.self_attn.q_proj"


def test_scaling_and_patterns_match_semantics_example():
    config = AdapterConfig.from_dict({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"layers.0.self_attn.q_proj": 4, "v_proj": 2}, "alpha_pattern": {"q_proj": 32}})
    got = {m: (config.rank(m), config.alpha(m), config.scaling(m)) for m in
           (Q0, "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj")}
    assert got == {Q0: (4, 32, 8.0), "model.layers.0.self_attn.v_proj": (2, 16, 8.0),
                   "model.layers.1.self_attn.q_proj": (8, 32, 4.0)}
    rs = AdapterConfig.from_dict({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True})
    assert rs.scaling(Q0) == 8.0


def test_target_module_resolution():
    listed = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                      "target_modules": ["q_proj", "mlp.down_proj"],
                                      "exclude_modules": ["layers.1.self_attn.q_proj"]})
    assert listed.matches(Q0) and listed.matches("model.layers.1.mlp.down_proj")
    assert not listed.matches("model.layers.1.self_attn.q_proj")  # excluded wins
    assert not listed.matches("model.layers.0.self_attn.xq_proj")  # suffix must follow a dot
    regex = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                     "target_modules": r".*layers\.1\..*_proj"})
    assert regex.matches("model.layers.1.mlp.up_proj") and not regex.matches("model.layers.0.mlp.up_proj")
    default = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    assert [m for m in SHAPES if default.matches(m)] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    layered = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                       "layers_to_transform": [1], "layers_pattern": "layers"})
    assert [m for m in SHAPES if layered.matches(m)] == ["model.layers.1.self_attn.q_proj"]


# Target-module matching (semantics §6.4): (module name, config fields, whether peft 0.21.2 targets it).
# Expectations were checked against peft's check_target_module_exists (and, for None / "all-linear", against
# get_peft_model on a tiny Llama), see the compat tests below.
L1 = "model.layers.1.self_attn.q_proj"
MOE = "model.layers.1.experts.0.w1"
MATCH_TABLE = [
    (Q0, {"target_modules": None}, True),
    ("model.layers.0.self_attn.k_proj", {"target_modules": None}, False),
    # "all-linear": every decoder projection, never the output layer
    (Q0, {"target_modules": "all-linear"}, True),
    ("model.layers.1.mlp.down_proj", {"target_modules": "all-linear"}, True),
    ("model.layers.1.self_attn.o_proj", {"target_modules": "ALL-LINEAR"}, True),
    ("lm_head", {"target_modules": "all-linear"}, False),
    ("model.layers.1.mlp.down_proj", {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}, False),
    # an empty layers_to_transform restricts nothing
    (L1, {"target_modules": ["q_proj"], "layers_to_transform": []}, True),
    (L1, {"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": "layers"}, True),
    # layers_pattern may sit at the very start of the name, but must be a whole dotted segment
    ("layers.1.self_attn.q_proj", {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
     True),
    ("layers.1.self_attn.q_proj", {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
     False),
    ("layers.1.self_attn.q_proj", {"target_modules": ["q_proj"], "layers_to_transform": [1]}, False),
    ("model.xlayers.1.self_attn.q_proj",
     {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}, False),
    # the FIRST index is the layer (MoE: layers.1.experts.0 is layer 1)
    (MOE, {"target_modules": ["w1"], "layers_to_transform": [1]}, True),
    (MOE, {"target_modules": ["w1"], "layers_to_transform": [0]}, False),
    (MOE, {"target_modules": ["w1"], "layers_to_transform": [1], "layers_pattern": "layers"}, True),
    (MOE, {"target_modules": ["w1"], "layers_to_transform": [0], "layers_pattern": "experts"}, True),
    (MOE, {"target_modules": ["w1"], "layers_to_transform": [0], "layers_pattern": ["blocks", "experts"]}, True),
    # ordinary rules
    (L1, {"target_modules": ["q_proj"], "layers_to_transform": 1}, True),
    ("model.layers.10.self_attn.q_proj", {"target_modules": ["q_proj"], "layers_to_transform": [1]}, False),
    (L1, {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ""}, True),
    (L1, {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "blocks"}, False),
    ("model.embed.proj", {"target_modules": ["proj"], "layers_to_transform": [0]}, False),
    ("model.layers.0.self_attn.xq_proj", {"target_modules": ["q_proj"]}, False),
    (L1, {"target_modules": ["self_attn.q_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]}, False),
    (L1, {"target_modules": ["q_proj"], "exclude_modules": r".*\.1\..*"}, False),
    (L1, {"target_modules": r".*layers\.1\..*_proj"}, True),
    (L1, {"target_modules": r"layers\.1\..*_proj"}, False),  # a regex must match the whole name
    # a list entry equal to the whole name matches whatever layers_to_transform says
    (Q0, {"target_modules": [Q0], "layers_to_transform": [1]}, True),
]
# Rows where reference/lora.py's `matches` disagrees with peft 0.21.2 (reported to the lead; not edited here):
# it applies layers_to_transform to an exact full-name match, which peft accepts without looking at the layer.
PEFT_CHECKABLE = [row for row in MATCH_TABLE  # None and "all-linear" are resolved against a model first
                  if row[1]["target_modules"] is not None and str(row[1]["target_modules"]).lower() != "all-linear"]


def _ids(rows):
    return [f"{name}|{fields}" for name, fields, _ in rows]


@pytest.mark.parametrize("name, fields, expected", MATCH_TABLE, ids=_ids(MATCH_TABLE))
def test_matches_follows_peft_rules_and_reference(name, fields, expected):
    config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **fields})
    assert config.matches(name) is expected
    targets = fields["target_modules"]
    kwargs = {k: fields.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules")}
    assert (ref_lora.resolve_targets([name], targets, **kwargs) == [name]) is expected


@pytest.mark.compat
@pytest.mark.parametrize("name, fields, expected", PEFT_CHECKABLE, ids=_ids(PEFT_CHECKABLE))
def test_matches_agrees_with_peft_check_target_module_exists(name, fields, expected):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    assert bool(check_target_module_exists(peft.LoraConfig(r=4, lora_alpha=8, **fields), name)) is expected


LAYER_RULES = [  # layer options peft's LoraConfig refuses too
    ({"target_modules": "all-linear", "layers_to_transform": [0]}, "layers_to_transform cannot"),
    ({"target_modules": r".*q_proj", "layers_pattern": "layers"}, "layers_pattern cannot"),
    ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "needs layers_to_transform"),
]


@pytest.mark.parametrize("fields, fragment", LAYER_RULES)
def test_layer_options_peft_refuses_are_refused(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **fields})


@pytest.mark.compat
@pytest.mark.parametrize("fields", [fields for fields, _ in LAYER_RULES])
def test_peft_refuses_the_same_layer_options(fields):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="layers_"):
        peft.LoraConfig(r=4, lora_alpha=8, **fields)


def _tiny_llama(transformers, torch):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.compat
@pytest.mark.parametrize("fields", [
    {"target_modules": None},
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "exclude_modules": ["down_proj", "layers.0.self_attn.k_proj"]},
    {"target_modules": ["o_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
], ids=str)
def test_matches_agrees_with_get_peft_model_on_a_tiny_llama(fields):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(transformers, torch)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in linears and len(linears) == 15
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **fields))
    wrapped = sorted(name for name, m in peft_model.base_model.model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **fields})
    assert sorted(name for name in linears if config.matches(name)) == wrapped
    assert 0 < len(wrapped) < len(linears)


def test_all_linear_adapter_covers_every_projection(tmp_path):
    adapter = random_adapter({**SHAPES, "lm_head": (128, 64)}, target_modules="all-linear", seed=5)
    assert sorted(adapter.modules()) == sorted(SHAPES)  # 14 = 7 projections x 2 layers; lm_head left alone
    adapter.save_peft_dir(tmp_path / "a")
    assert Adapter.from_peft_dir(tmp_path / "a").tensors == adapter.tensors


def test_config_round_trips_unknown_fields_exactly():
    raw = {**PEFT_DEFAULTS, "r": 4, "target_modules": ["v_proj", "q_proj"], "future_field": {"x": [1, 2]}}
    config = AdapterConfig.from_dict(raw)
    assert config.to_dict() == raw and list(config.to_dict()["target_modules"]) == ["v_proj", "q_proj"]


@pytest.mark.parametrize("patch, fragment", [
    ({"peft_type": "IA3"}, "only 'LORA'"),
    ({"r": 0}, "positive integer"),
    ({"r": "8"}, "positive integer"),
    ({"lora_alpha": None}, "finite number"),
    ({"use_dora": True, "lora_bias": True}, "not allowed with use_dora"),
    ({"target_modules": r"(unclosed"}, "regular expression"),
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": -2}}, "rank_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_config_rejections(patch, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        AdapterConfig.from_dict({**PEFT_DEFAULTS, **patch})


def test_config_missing_field_is_named():
    with pytest.raises(ConfigError, match="'r'"):
        AdapterConfig.from_dict({"peft_type": "LORA", "lora_alpha": 16})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_dir_round_trip_is_byte_identical(tmp_path, dtype, use_dora):
    adapter = random_adapter(SHAPES, use_dora=use_dora, dtype=dtype, seed=3)
    adapter.save_peft_dir(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == adapter.config.to_dict() and config["use_dora"] is use_dora
    assert (tmp_path / "a" / "adapter_config.json").read_text() == json.dumps(config, indent=2, sort_keys=True)
    again = Adapter.from_peft_dir(tmp_path / "a")
    assert again.tensors == adapter.tensors
    _, metadata = read_safetensors((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    assert metadata == {"format": "pt"}
    assert [p.name for p in (tmp_path).iterdir()] == ["a"]  # no temp dir left behind


def test_safetensors_interop_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "y": np.ones(5, dtype=np.float16)}
    st.save_file(arrays, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    ours, metadata = read_safetensors((tmp_path / "ref.safetensors").read_bytes())
    assert metadata == {"format": "pt"}
    assert {k: t.stored().tolist() for k, t in ours.items()} == {k: v.tolist() for k, v in arrays.items()}
    (tmp_path / "ours.safetensors").write_bytes(write_safetensors(ours, {"format": "pt"}))
    back = st.load_file(tmp_path / "ours.safetensors")
    assert all(back[k].tobytes() == arrays[k].tobytes() for k in arrays)


def test_bf16_rounding_matches_reference():
    x = np.random.default_rng(0).normal(size=4096).astype(np.float32) * 3
    stored = RawTensor.from_array(x, "BF16").to_float32()
    assert not np.array_equal(stored, x)  # rounding happened
    np.testing.assert_array_equal(stored, round_to_bf16(x))


def test_modules_give_float32_arrays_and_scaling():
    adapter = random_adapter(SHAPES, r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"), use_rslora=True)
    modules = adapter.modules()
    assert sorted(modules) == sorted(m for m in SHAPES if m.endswith(("q_proj", "down_proj")))
    down = modules["model.layers.1.mlp.down_proj"]
    assert (down.rank, down.in_features, down.out_features) == (4, 128, 64)
    assert down.lora_A.dtype == np.float32 and np.abs(down.lora_B).max() > 0  # not a no-op (init False)
    assert down.scaling == 8 / math.sqrt(4)
    assert adapter.module_shapes()["model.layers.1.mlp.down_proj"] == SHAPES["model.layers.1.mlp.down_proj"]
    assert adapter.nbytes == sum(4 * (4 * i + o * 4) for o, i in (SHAPES[m] for m in modules))


def test_dora_magnitude_is_row_norm_of_merged_weight():
    rng = np.random.default_rng(1)
    base = {m: rng.normal(size=s).astype(np.float32) for m, s in SHAPES.items()}
    adapter = random_adapter(SHAPES, use_dora=True, base_weights=base)
    q = adapter.modules()[Q0]
    # independent float64 computation of ||W + s B A||_row (semantics §5.2)
    expected = np.linalg.norm(base[Q0].astype(np.float64) + 2.0 * (q.lora_B.astype(np.float64) @ q.lora_A), axis=1)
    np.testing.assert_allclose(q.magnitude, expected, rtol=1e-5)


def _write_dir(path, config, tensors):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(write_safetensors(tensors, {"format": "pt"}))
    return path


def _bad_dirs():
    good = random_adapter(SHAPES, use_dora=True)
    config, tensors = good.config.to_dict(), dict(good.tensors)
    a_key, b_key, m_key = (peft_key(Q0, p) for p in ("lora_A", "lora_B", "magnitude"))
    nan = good.modules()[Q0].lora_A.copy()
    nan[1, 2] = np.nan
    yield "missing lora_B", config, {k: v for k, v in tensors.items() if k != b_key}, "lora_B"
    yield "missing magnitude", config, {k: v for k, v in tensors.items() if k != m_key}, "magnitude"
    yield "magnitude without dora", {**config, "use_dora": False}, tensors, "use_dora=false"
    yield "extra key", config, {**tensors, "base_model.model.lm_head.weight": tensors[a_key]}, "unexpected tensor"
    yield "untargeted module", config, {**tensors, peft_key("model.layers.0.mlp.up_proj", "lora_A"): tensors[a_key]}, \
        "does not select"
    yield "bad rank", {**config, "r": 4}, tensors, r"shape \[8, 64\]; expected \[r, in\] with r=4"
    yield "bad magnitude", config, {**tensors, m_key: RawTensor.from_array(np.ones(7, np.float32))}, r"\[out\] = \[64\]"
    yield "nan", config, {**tensors, a_key: RawTensor.from_array(nan)}, "1 NaN/Inf"
    yield "int dtype", config, {**tensors, a_key: RawTensor("I32", (8, 64), bytes(8 * 64 * 4))}, "dtype I32"


@pytest.mark.parametrize("case", list(_bad_dirs()), ids=lambda c: c[0])
def test_bad_adapter_dirs_are_rejected_with_the_key(tmp_path, case):
    _, config, tensors, fragment = case
    path = _write_dir(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterFormatError, match=fragment):
        Adapter.from_peft_dir(path)


def test_pickle_is_refused_with_conversion_advice(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(PEFT_DEFAULTS))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(AdapterFormatError, match="never loads.*save_file.*safe_serialization=True"):
        Adapter.from_peft_dir(tmp_path)


@pytest.mark.parametrize("text, fragment", [(None, "needs adapter_config.json"), ("{not json", "not valid JSON")])
def test_missing_or_malformed_config(tmp_path, text, fragment):
    (tmp_path / "adapter_model.safetensors").write_bytes(random_adapter(SHAPES).safetensors_bytes())
    if text is not None:
        (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFormatError, match=fragment):
        Adapter.from_peft_dir(tmp_path)


def test_truncated_safetensors_is_rejected():
    data = random_adapter(SHAPES).safetensors_bytes()
    with pytest.raises(AdapterFormatError, match="data_offsets|exceeds"):
        read_safetensors(data[:-10])


def test_adapter_module_does_not_import_torch():
    code = "import adapterhub.adapter, adapterhub.safetensors_io, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.compat
def test_peft_loads_what_we_write(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(transformers, torch)
    base = {m: model.get_submodule(m).weight.detach().numpy() for m in SHAPES}
    adapter = random_adapter(SHAPES, use_dora=True, base_weights=base)
    adapter.save_peft_dir(tmp_path / "a")
    ids = torch.arange(10).reshape(1, 10)
    before = model(ids).logits
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "a")
    loaded = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(loaded.lora_A["default"].weight, torch.from_numpy(adapter.modules()[Q0].lora_A))
    assert not torch.allclose(peft_model(ids).logits, before)  # the adapter is live
    peft_model.save_pretrained(tmp_path / "b")
    assert Adapter.from_peft_dir(tmp_path / "b").tensors == adapter.tensors


@pytest.mark.compat
def test_peft_loads_an_all_linear_adapter_onto_the_same_modules(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(transformers, torch)
    adapter = random_adapter({**SHAPES, "lm_head": (128, 64)}, target_modules="all-linear", seed=6)
    adapter.save_peft_dir(tmp_path / "a")
    ids = torch.arange(10).reshape(1, 10)
    before = model(ids).logits
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "a")
    assert not torch.allclose(peft_model(ids).logits, before)  # the adapter is live
    base = peft_model.base_model.model
    wrapped = {name: m for name, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(wrapped) == sorted(adapter.modules())
    for name, module in adapter.modules().items():
        assert torch.equal(wrapped[name].lora_B["default"].weight, torch.from_numpy(module.lora_B)), name
