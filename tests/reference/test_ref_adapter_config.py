"""adapterhub.adapter.AdapterConfig implements the same rank/alpha/scaling/target rules as reference/lora.py."""

import pytest

from adapterhub import adapter
from reference import lora as ref

MODULES = [
    f"model.layers.{i}.{part}"
    for i in range(12)
    for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
]

CONFIGS = [
    dict(r=8, lora_alpha=16, target_modules=None),
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
         rank_pattern={"layers.0.self_attn.q_proj": 4, "v_proj": 2}, alpha_pattern={"q_proj": 32}),
    dict(r=4, lora_alpha=8, target_modules=["mlp.down_proj", "model.layers.3.self_attn.o_proj"],
         rank_pattern={r"layers\.1\d\..*": 2, "down_proj": 6}),
    dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.(1|11)\.(self_attn|mlp)\.(q|up)_proj"),
    dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1, 10]),
    dict(r=4, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=2, layers_pattern="layers"),
    dict(r=4, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=[0, 2], layers_pattern=["blocks", "layers"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=["model.layers.0.mlp.up_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], exclude_modules=r".*\.1\d\..*"),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda c: str(c)[:60])
def test_adapter_config_agrees_with_reference(fields):
    config = adapter.AdapterConfig.from_dict({"peft_type": "LORA", **fields})
    match_kwargs = {k: fields.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules")}
    targets = fields["target_modules"] or ref.DEFAULT_TARGETS["llama"]
    selected = 0
    for name in MODULES:
        want = ref.matches(name, targets, **match_kwargs)
        assert config.matches(name) == want, name
        selected += want
        r, alpha, s = ref.module_scaling(
            name, fields["r"], fields["lora_alpha"], fields.get("rank_pattern"), fields.get("alpha_pattern"),
            fields.get("use_rslora", False),
        )
        assert (config.rank(name), config.alpha(name)) == (r, alpha), name
        assert config.scaling(name) == pytest.approx(s, rel=1e-15), name
    assert 0 < selected < len(MODULES)  # each case selects some modules and rejects others
