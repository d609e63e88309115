"""Base.export (runtime/export.py, docs/semantics.md §4.6): a merged checkpoint that transformers, PEFT and
bitsandbytes agree with.

- fp32: transformers loads the export and its logits are the unmerged adapterhub forward (LoRA, DoRA; Llama, Qwen2).
- bf16: the export is PEFT's `merge_and_unload()` + `save_pretrained` within one bf16 ulp, tensor by tensor.
- NF4: transformers + bitsandbytes load the export, and every weight dequantizes to reference/nf4.py's
  quantization of the merged dense weight, bit for bit (quantized once, §1-§3).
- An NF4-loaded base exports exactly what a dense base holding its dequantized weights exports; the requantizing
  merge reports (and warns about) the delta it loses; unmerge restores the original bytes.
- Files: shards + index, config / generation config / tokenizer, tied lm_head left out; bad arguments refused
  before anything is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapterhub.adapter import random_adapter
from adapterhub.errors import ConfigError
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.tiny import random_checkpoint
from adapters_fixtures import ALL_LINEAR
from model_fixtures import FAMILIES, family_config
from reference import nf4 as ref_nf4

FAMILY_IDS = ["llama", "qwen2"]  # GQA + attention/o bias + llama3 RoPE; q/k/v bias + tied embeddings
KINDS = ["lora", "dora"]
# NF4 tests: 64-aligned in_features (whole blocks per row), as every real model has; bitsandbytes' CPU
# dequantize is wrong otherwise (semantics §1.5 quirk 1), and the fixtures' intermediate_size is 96.
NF4_LLAMA = ModelConfig.from_hf_json({**FAMILIES["llama"], "intermediate_size": 128})
PROMPTS = ["Merge me", "hi", "a longer prompt here"]


# --- helpers -----------------------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path, config: ModelConfig, name: str = "ckpt") -> Path:
    return random_checkpoint(tmp_path / name, config, seed=3, std=0.15)


def _adapter(base, kind: str, *, lora_alpha: float = 8, seed: int = 1):
    """An all-linear r=4 LoRA, or a DoRA whose magnitude looks trained: random in [0.5, 1.5) per row, where the
    row norms are about 1.2-1.7. (PEFT's initial magnitude m = ||W + s B A||_row gives m / n = 1, and a DoRA merge that
    dropped its scale would pass every test.)"""
    return random_adapter(base.module_shapes(), r=4, lora_alpha=lora_alpha, target_modules=ALL_LINEAR,
                          use_dora=kind == "dora", seed=seed)


def _padded_batch(tokenizer):
    """PROMPTS left-padded (as a generation batch is): ids (B, T), mask (B, T), HF position ids (B, T)."""
    rows = [tokenizer.encode(p) for p in PROMPTS]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    assert mask.sum(1).unique().numel() == len(PROMPTS)  # every row a different length: real padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir, single file or shards."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _bf16_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable bf16 values lie between a and b (0: bit-identical up to ±0, 1: one ulp apart),
    from the bit patterns: sign-magnitude int16 -> an integer line that orders bf16 values (finite inputs)."""
    def ordinal(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordinal(a) - ordinal(b)).abs()


def _linear_bytes(base) -> dict[str, torch.Tensor]:
    """Copies of the stored tensors of every decoder linear's weight (the NF4 bytes for a 4-bit base)."""
    linears = base.model.linears().items()
    return {k: v.clone() for m, layer in linears for k, v in layer.weight.state_dict(m + ".").items()}


# --- 1. fp32 export = the unmerged forward, in transformers -------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_fp32_export_loads_in_transformers_with_the_unmerged_adapter_logits(tmp_path, family, kind):
    transformers = pytest.importorskip("transformers")
    base = load_base(_checkpoint(tmp_path, family_config(family)), quantize=None, compute_dtype=torch.float32)
    base.add_adapter(_adapter(base, kind), name=kind)
    ids, mask, positions = _padded_batch(base.tokenizer)
    real = mask.bool()
    plain = base(ids, attention_mask=mask)
    unmerged = base(ids, adapters=[kind] * len(PROMPTS), attention_mask=mask)
    assert (unmerged - plain)[real].abs().max() > 0.1  # the adapter changes the logits: a non-vacuous test

    assert base.merge(kind).max_abs_error == 0.0
    result = base.export(tmp_path / "out", dtype="float32")
    assert result.merged == kind and result.dtype == "float32" and result.quantize is None

    hf = transformers.AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(theirs[real], unmerged[real], rtol=0, atol=1e-4)  # padded positions: unspecified


# --- 2. bf16 export = PEFT merge_and_unload ------------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_bf16_export_equals_peft_merge_and_unload_within_one_ulp(tmp_path, family, kind):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = family_config(family)
    ckpt = _checkpoint(tmp_path, config)
    base = load_base(ckpt, quantize=None, compute_dtype=torch.bfloat16)
    adapter = _adapter(base, kind)
    adapter.save_peft_dir(tmp_path / "peft")
    base.add_adapter(adapter, name=kind)
    base.merge(kind)
    ours = _tensors(base.export(tmp_path / "ours", dtype="bfloat16").path)

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}  # PEFT keeps fp32 adapters in a bf16 model (semantics §10.2)
    model.merge_and_unload().save_pretrained(tmp_path / "theirs")
    theirs = _tensors(tmp_path / "theirs")

    if config.tie_word_embeddings:
        assert "lm_head.weight" not in ours
    assert set(ours) - {"lm_head.weight"} == set(theirs) - {"lm_head.weight"}
    if config.attention_bias:
        assert "model.layers.0.self_attn.q_proj.bias" in ours  # Qwen2's / Llama's qkv bias is kept

    original = load_file(ckpt / "model.safetensors")
    identical = total = 0
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape, name
        apart = _bf16_ulps_apart(a, b)
        assert int(apart.max()) <= 1, f"{name}: {int((apart > 1).sum())} elements more than one bf16 ulp apart"
        identical, total = identical + int((apart == 0).sum()), total + a.numel()
        if name.removesuffix(".weight") in base.model.linears():  # a decoder linear: the adapter is merged in
            assert not torch.equal(a, original[name].to(torch.bfloat16)), f"{name}: the merge changed nothing"
    print(f"\n{family}/{kind}: {identical} of {total} bf16 elements bit-identical to PEFT, "
          f"{total - identical} one ulp apart")


# --- 3. NF4 export = reference quantization of the merged weight, in bitsandbytes ------------------------------


@pytest.mark.compat
def test_nf4_export_loads_in_bitsandbytes_and_dequantizes_to_the_reference(tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    ckpt = _checkpoint(tmp_path, NF4_LLAMA)
    base = load_base(ckpt, quantize=None, compute_dtype=torch.float32)
    unmerged = _tensors(base.export(tmp_path / "unmerged", dtype="bfloat16").path)
    adapter = _adapter(base, "lora")
    base.add_adapter(adapter, name="lora")
    base.merge("lora")
    dense = _tensors(base.export(tmp_path / "dense", dtype="bfloat16").path)  # the merged dense bf16 weights
    path = base.export(tmp_path / "nf4", dtype="bfloat16", quantize="nf4").path

    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (qconfig["quant_method"], qconfig["bnb_4bit_quant_type"]) == ("bitsandbytes", "nf4")
    assert qconfig["bnb_4bit_use_double_quant"] and qconfig["bnb_4bit_compute_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")  # no forward: §3.4, §5.6
    saved, original = _tensors(path), load_file(ckpt / "model.safetensors")
    linears = list(base.model.linears())
    assert len(linears) == 2 * 7
    for name in linears:
        param = hf.get_submodule(name).weight
        assert isinstance(param, bnb.nn.Params4bit), name
        assert param.quant_state.quant_type == "nf4" and param.quant_state.dtype == torch.bfloat16, name
        theirs = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        merged = dense[name + ".weight"]
        m = adapter.modules()[name]
        W = original[name + ".weight"]  # fp32
        assert torch.equal(merged, (W + (torch.from_numpy(m.lora_B) @ torch.from_numpy(m.lora_A)) * m.scaling)
                           .to(torch.bfloat16)), name  # fp32 W + s B A, rounded once (§4.6)
        assert not torch.equal(merged, unmerged[name + ".weight"])  # the adapter is in the weight quantized
        # the reference, given the offset the file states (a float32 mean torch and NumPy may round apart, §9.11)
        ref = ref_nf4.quantize(merged.float().numpy(), 64, True, "bfloat16", offset=param.quant_state.offset.item())
        assert bytes(saved[name + ".weight"].numpy()) == bytes(ref["weight"]), name  # the 4-bit codes
        want = torch.from_numpy(ref_nf4.dequantize(ref, "bfloat16")).to(torch.bfloat16)
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, want), name
        assert not torch.equal(theirs, merged)  # quantized: a real 4-bit weight, not a dense copy
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):  # not quantized (§3.2)
        assert torch.equal(hf.get_parameter(name).data, dense[name]), name


# --- 4. an NF4 base: export merges once on the dequantized weights; merge loses, unmerge restores ---------------


def _nf4_and_dequantized(tmp_path: Path):
    """An NF4-loaded base (fp32 compute) and a dense fp32 base loaded from its dequantized weights (its own
    unmerged fp32 export), with those weights."""
    nf4 = load_base(_checkpoint(tmp_path, NF4_LLAMA), quantize="nf4", compute_dtype=torch.float32)
    assert {layer.weight.format for layer in nf4.model.linears().values()} == {"nf4"}
    path = nf4.export(tmp_path / "dequantized", dtype="float32").path
    return nf4, load_base(path, quantize=None, compute_dtype=torch.float32), _tensors(path)


@pytest.mark.parametrize("kind", KINDS)
def test_nf4_base_export_equals_dense_export_of_its_dequantized_weights(tmp_path, kind):
    nf4, dense, dequantized = _nf4_and_dequantized(tmp_path)
    adapter = _adapter(dense, kind)
    nf4.add_adapter(adapter, name=kind)
    dense.add_adapter(adapter, name=kind)
    original = _linear_bytes(nf4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a requantizing merge may warn (next test)
        assert nf4.merge(kind).quantized
    dense.merge(kind)

    ours = _tensors(nf4.export(tmp_path / "from_nf4", dtype="float32").path)
    want = _tensors(dense.export(tmp_path / "from_dense", dtype="float32").path)
    assert ours.keys() == want.keys()
    for name in want:
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], want[name]), name
    for module, layer in nf4.model.linears().items():
        key = module + ".weight"
        assert not torch.equal(ours[key], dequantized[key]), key  # the adapter is merged in
        assert not torch.equal(ours[key], layer.dequantized_weight()), key  # not the requantized merge

    assert nf4.unmerge() == kind
    restored = _linear_bytes(nf4)
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(restored[key], value), key  # the original NF4 bytes, exactly


def test_requantizing_merge_reports_the_lost_delta_and_warns(tmp_path):
    nf4, dense, _ = _nf4_and_dequantized(tmp_path)
    small = _adapter(dense, "lora", lora_alpha=1)  # s = 1/4: its delta is below NF4's per-element error
    nf4.add_adapter(small, name="small")
    dense.add_adapter(small, name="small")
    linears = nf4.model.linears()
    before = {name: layer.dequantized_weight().float() for name, layer in linears.items()}
    with pytest.warns(UserWarning, match=r"base\.export"):
        lossy = nf4.merge("small")  # dequantize, merge, requantize (§4.4)
    assert lossy.quantized and lossy.max_abs_error > 0
    assert lossy.delta_error_max > 0.1 and lossy.warning is not None
    errors = []  # independently: ||(W_stored - W) - s B A|| / ||s B A|| per module, in float64
    for name, m in small.modules().items():
        dW = torch.from_numpy(m.lora_B).double() @ torch.from_numpy(m.lora_A).double() * m.scaling
        stored = linears[name].dequantized_weight().double() - before[name].double()
        errors.append(float(torch.linalg.norm(stored - dW) / torch.linalg.norm(dW)))
    assert lossy.modules == len(errors)
    assert lossy.delta_error_max == pytest.approx(max(errors), rel=1e-4)
    assert lossy.delta_error_mean == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dense fp32 merge does not warn
        exact = dense.merge("small")
    assert not exact.quantized and exact.max_abs_error == 0 and exact.delta_error_max < 1e-6
    assert exact.warning is None


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_export_of_an_fp32_merge_reports_the_rounding_of_the_delta(tmp_path, kind):
    ckpt = _checkpoint(tmp_path, family_config("llama"))
    base = load_base(ckpt, quantize=None, compute_dtype=torch.float32)
    adapter = _adapter(base, kind, lora_alpha=1)  # small: bf16 rounding costs a visible share of it
    base.add_adapter(adapter, name=kind)
    original = load_file(ckpt / "model.safetensors")
    assert base.merge(kind).delta_error_max == 0.0  # fp32 merge stored unrounded
    held = {name: layer.dequantized_weight().clone() for name, layer in base.model.linears().items()}
    result = base.export(tmp_path / "out", dtype="bfloat16")
    base.export(tmp_path / "nf4", quantize="nf4")
    for name, layer in base.model.linears().items():
        assert torch.equal(layer.dequantized_weight(), held[name]), name  # exporting leaves the base as it was
    written = _tensors(result.path)
    errors = []  # independently, in float64: the exact merge (semantics §4.4, §5.4) against what was written
    for name, m in adapter.modules().items():
        W = original[name + ".weight"].double()
        V = W + torch.from_numpy(m.lora_B).double() @ torch.from_numpy(m.lora_A).double() * m.scaling
        if m.magnitude is not None:  # DoRA: rows rescaled to the magnitude
            V = torch.from_numpy(m.magnitude).double()[:, None] / V.norm(dim=1)[:, None] * V
        exact = V
        errors.append(float((written[name + ".weight"].double() - exact).norm() / (exact - W).norm()))
    assert result.delta_error_max == pytest.approx(max(errors), rel=1e-3) and result.delta_error_max > 1e-3
    assert result.delta_error_mean == pytest.approx(sum(errors) / len(errors), rel=1e-3)


# --- 5. files ------------------------------------------------------------------------------------------------


def _merged_qwen2(tmp_path: Path):
    base = load_base(_checkpoint(tmp_path, family_config("qwen2")), quantize=None, compute_dtype=torch.float32)
    base.add_adapter(_adapter(base, "lora"), name="lora")
    base.merge("lora")
    return base


def test_sharded_export_writes_an_index_covering_every_tensor(tmp_path):
    base = _merged_qwen2(tmp_path)
    single = base.export(tmp_path / "single", dtype="bfloat16")
    result = base.export(tmp_path / "sharded", dtype="bfloat16", shard_size="40KB")
    path = result.path
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (path / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors, where = {}, {}
    for shard in shards:
        part = load_file(shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 40_000 or len(part) == 1, shard.name
        tensors.update(part)
        where.update(dict.fromkeys(part, shard.name))
    assert index["weight_map"] == where  # every tensor, each in the file the index names
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    everything = _tensors(single.path)
    assert tensors.keys() == everything.keys() and all(torch.equal(tensors[k], everything[k]) for k in tensors)
    assert "lm_head.weight" not in tensors  # tied to the embeddings: left out (§4.6)

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file() and result.files[name] == (path / name).stat().st_size, name
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 257
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    assert set(result.files) == {p.name for p in path.iterdir()}


@pytest.mark.compat
def test_transformers_ties_the_left_out_lm_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _merged_qwen2(tmp_path)
    path = base.export(tmp_path / "sharded", dtype="float32", shard_size="40KB").path
    assert "lm_head.weight" not in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    embed = hf.get_input_embeddings().weight
    assert hf.lm_head.weight.data_ptr() == embed.data_ptr()
    assert torch.equal(embed, base.model.model.embed_tokens.weight)
    ids = torch.tensor([base.tokenizer.encode("tied")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, base(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("argument, value", [
    ("dtype", "int8"), ("quantize", "dense"), ("quantize", "q3"),
    ("shard_size", "big"), ("shard_size", 0), ("shard_size", -1),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, argument, value):
    base = load_base(_checkpoint(tmp_path, family_config("llama")), quantize=None, compute_dtype=torch.float32)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as error:
        base.export(out, **{argument: value})
    message = str(error.value)
    assert repr(value) in message and argument.split("_")[0] in message, message
    assert not out.exists()


def test_bf16_ulp_distance_helper():
    """The comparison of test 2 can fail: neighbours are 1 apart, sign and ±0 handled."""
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    up = one.view(torch.int16).add(1).view(torch.bfloat16)  # the next bf16 above 1.0: 1 + 2**-7
    assert float(up) == 1 + 2**-7
    assert _bf16_ulps_apart(one, up).item() == 1 and _bf16_ulps_apart(-one, -up).item() == 1
    assert _bf16_ulps_apart(one, one + 2 * 2**-7).item() == 2
    assert _bf16_ulps_apart(torch.tensor([0.0]).bfloat16(), torch.tensor([-0.0]).bfloat16()).item() == 0
    smallest = torch.tensor([1], dtype=torch.int16).view(torch.bfloat16)
    assert _bf16_ulps_apart(smallest, -smallest).item() == 2
    assert np.isclose(float(smallest), 2.0**-133)
