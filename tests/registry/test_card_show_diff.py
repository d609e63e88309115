"""The model card travels with a version; `show` summarizes a version's tensors; `diff` gives each differing
tensor's shapes and relative change ‖a − b‖ / ‖a‖, checked on values computed here from the arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.adapter import PEFT_DEFAULTS, Adapter, AdapterConfig, peft_key
from adapterhub.cli import main
from adapterhub.errors import AdapterFormatError
from tests.registry.helpers import SHAPES, make_adapter

CARD = "---\nlibrary_name: peft\nbase_model: org/base\n---\n# SQL adapter\n\nTrained on café menus ✓\n"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def mixed_rank_adapter(seed: int, rank_pattern: dict) -> tuple[Adapter, dict[str, np.ndarray]]:
    """q_proj at r=8, v_proj at the rank rank_pattern gives it; returns the adapter and its float32 arrays."""
    rng = np.random.default_rng(seed)
    config = {**PEFT_DEFAULTS, "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": rank_pattern}
    arrays, parsed = {}, AdapterConfig.from_dict(config)
    for module, (d_out, d_in) in SHAPES.items():
        r = parsed.rank(module)
        arrays[peft_key(module, "lora_A")] = rng.standard_normal((r, d_in)).astype(np.float32)
        arrays[peft_key(module, "lora_B")] = rng.standard_normal((d_out, r)).astype(np.float32)
    return Adapter(config, arrays), arrays


def test_the_model_card_travels_with_the_version(tmp_path):
    src = make_adapter(0).save_peft_dir(tmp_path / "peft")
    (src / "README.md").write_text(CARD, encoding="utf-8")
    store = tmp_path / "store"
    run("push", src, "sql", "-r", store)
    assert Registry(store).load("sql@v1").model_card == CARD
    run("pull", "sql@v1", "-o", tmp_path / "pulled", "-r", store)
    assert (tmp_path / "pulled" / "README.md").read_bytes() == CARD.encode()
    assert json.loads(run("show", "sql@v1", "-r", store, "--json"))["model_card"] == CARD
    assert f"card     README.md, {len(CARD.encode())} bytes" in run("show", "sql@v1", "-r", store)
    (src / "README.md").write_text(CARD + "v2\n", encoding="utf-8")  # a new card is new content: a new version
    assert run("push", src, "sql", "-r", store) == "sql@v2\n"


def test_a_version_without_a_card_pulls_without_one(tmp_path):
    reg = Registry(tmp_path / "store")
    reg.push(make_adapter(0), "sql")
    reg.pull("sql@v1", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_an_oversized_card_is_refused(tmp_path):
    src = make_adapter(0).save_peft_dir(tmp_path / "peft")
    (src / "README.md").write_text("x" * (1024 * 1024 + 1))
    with pytest.raises(AdapterFormatError, match="README.md"):
        Adapter.from_peft_dir(src)


def test_show_summarizes_tensors_and_lists_them_on_request(tmp_path):
    adapter, arrays = mixed_rank_adapter(0, {"v_proj": 4})
    store = tmp_path / "store"
    Registry(store).push(adapter, "mix")
    shown = json.loads(run("show", "mix@v1", "-r", store, "--json"))
    assert shown["summary"] == {
        "kind": "LoRA", "tensors": 8, "modules": 4, "bytes": sum(a.nbytes for a in arrays.values()),
        "ranks": {"4": 2, "8": 2}, "dtypes": {"F32": 8}, "targets": {"self_attn.q_proj": 2, "self_attn.v_proj": 2}}
    text = run("show", "mix@v1", "-r", store)
    assert "modules  4; ranks r=4 ×2, r=8 ×2; targets self_attn.q_proj ×2, self_attn.v_proj ×2" in text
    assert f"tensors  8, {sum(a.nbytes for a in arrays.values())} bytes (F32 ×8)" in text
    assert "lora_A.weight" not in text
    listed = run("show", "mix@v1", "-r", store, "--tensors")
    for key, array in arrays.items():
        assert f"  {key}  F32{list(array.shape)}  " in listed


def test_diff_gives_shapes_and_the_relative_change_of_each_tensor(tmp_path):
    v1, arrays = mixed_rank_adapter(0, {"v_proj": 4})
    changed = peft_key("model.layers.0.self_attn.q_proj", "lora_B")
    nudged = dict(arrays)
    nudged[changed] = arrays[changed] + np.float32(0.1) * np.random.default_rng(1).standard_normal(
        arrays[changed].shape).astype(np.float32)
    # layer 1's v_proj drops to r=2: its two tensors change shape
    rank_pattern = {"layers.1.self_attn.v_proj": 2, "v_proj": 4}
    _, reranked = mixed_rank_adapter(7, rank_pattern)
    resized = [peft_key("model.layers.1.self_attn.v_proj", part) for part in ("lora_A", "lora_B")]
    v2_arrays = {**nudged, **{key: reranked[key] for key in resized}}
    config = {**v1.config.to_dict(), "rank_pattern": rank_pattern}
    store = tmp_path / "store"
    reg = Registry(store)
    reg.push(v1, "sql")
    reg.push(Adapter(config, v2_arrays), "sql")

    diffed = json.loads(run("diff", "sql@v1", "sql@v2", "-r", store, "--json"))
    assert diffed["config"] == {"rank_pattern": [{"v_proj": 4}, rank_pattern]}
    by_name = {t["name"]: t for t in diffed["tensors"]}
    assert sorted(by_name) == sorted([changed, *resized])
    a, b = arrays[changed].astype(np.float64), nudged[changed].astype(np.float64)
    expected = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    assert by_name[changed]["relative_change"] == pytest.approx(expected, rel=1e-12)
    assert 0.05 < expected < 0.2 and by_name[changed]["shape"] == [[64, 8], [64, 8]]
    assert by_name[resized[0]] == {"name": resized[0], "change": "changed", "dtype": ["F32", "F32"],
                                   "shape": [[4, 64], [2, 64]], "relative_change": None}
    text = run("diff", "sql@v1", "sql@v2", "-r", store)
    assert f"~ {changed}  F32[64, 8]  relative change {expected:.3e}" in text
    assert f"~ {resized[0]}  F32[4, 64] → F32[2, 64]  relative change n/a" in text


def test_diff_names_added_and_removed_tensors_and_differing_bases(tmp_path):
    store = tmp_path / "store"
    reg = Registry(store)
    full = make_adapter(0)
    config = {**full.config.to_dict(), "target_modules": ["q_proj"], "base_model_name_or_path": "org/base"}
    only_q = Adapter(config, {k: t for k, t in full.tensors.items() if ".q_proj." in k})
    reg.push(full, "sql")
    reg.push(only_q, "sql")
    diffed = json.loads(run("diff", "sql@v1", "sql@v2", "-r", store, "--json"))
    removed = [t for t in diffed["tensors"] if t["change"] == "removed"]
    assert len(removed) == 4 and all(t["shape"][1] is None and t["dtype"][1] is None for t in removed)
    assert diffed["base"] == {"a": None, "b": {"name_or_path": "org/base"}}
    text = run("diff", "sql@v1", "sql@v2", "-r", store)
    assert "base   not recorded → org/base" in text and text.count("\n- ") + text.startswith("- ") == 4
