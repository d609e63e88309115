"""reference/lora.py against PEFT 0.21.2: layer outputs, scaling, patterns, targets, DoRA, merges."""

import numpy as np
import pytest

from reference import bf16
from reference import lora as ref

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.compat


class Tiny(torch.nn.Module):
    def __init__(self, din=16, dout=12, bias=True):
        super().__init__()
        self.proj = torch.nn.Linear(din, dout, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_layer(dtype=torch.float32, seed=0, **config):
    """A PEFT LoRA layer on a random Linear(16 -> 12), adapter weights non-zero (init_lora_weights=False)."""
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
    config = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False) | config
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    return model, model.base_model.model.proj


def arrays(layer):
    A = layer.lora_A["default"].weight.detach().float().numpy().copy()
    B = layer.lora_B["default"].weight.detach().float().numpy().copy()
    W = layer.base_layer.weight.detach().float().numpy().copy()
    b = layer.base_layer.bias.detach().float().numpy()
    return W, b, A, B, layer.scaling["default"]


def make_dyadic(layer, seed=0):
    """Set A, B to multiples of 1/512 so B @ A * s is exact in float32: the merge tests then compare bits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randint(-64, 65, p.shape, generator=g).float() / 512)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_and_scaling(use_rslora):
    model, layer = peft_layer(r=16, lora_alpha=32, use_rslora=use_rslora)
    assert layer.scaling["default"] == ref.scaling(32, 16, use_rslora) == (8.0 if use_rslora else 2.0)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        got = model(x).numpy()
        base = layer.base_layer(x).numpy()
    W, b, A, B, s = arrays(layer)
    want = ref.lora_forward(x.numpy(), W, b, A, B, s)
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rank_and_alpha_patterns_section_4_2_example():
    from hf_tiny import build_hf_model

    rank_pattern, alpha_pattern = {"layers.0.self_attn.q_proj": 4, "v_proj": 2}, {"q_proj": 32}
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model = peft.get_peft_model(build_hf_model("llama"), cfg)
    seen = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A"):
            seen[name] = (mod.r["default"], mod.lora_alpha["default"], mod.scaling["default"])
            assert ref.module_scaling(name, 8, 16, rank_pattern, alpha_pattern) == seen[name]
    assert seen["model.layers.0.self_attn.q_proj"] == (4, 32, 8.0)
    assert seen["model.layers.1.self_attn.v_proj"] == (2, 16, 8.0)
    assert seen["model.layers.1.self_attn.q_proj"] == (8, 32, 4.0)


TARGET_CASES = [
    dict(target_modules=None),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "mlp.down_proj"]),
    dict(target_modules=r"model\.layers\.1\..*_proj"),
    dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules="all-linear", exclude_modules=["gate_proj", "model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"),
]


@pytest.mark.parametrize("case", TARGET_CASES, ids=str)
def test_target_resolution_matches_peft(case):
    from hf_tiny import build_hf_model

    base = build_hf_model("llama")
    linear_names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, **case))
    targeted = sorted(n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A"))
    kwargs = {k: v for k, v in case.items() if k != "target_modules"}
    assert sorted(ref.resolve_targets(linear_names, case["target_modules"], **kwargs)) == targeted
    assert targeted  # every case targets something
    if case == dict(target_modules="all-linear"):
        stored = model.peft_config["default"].target_modules
        assert sorted(stored) == targeted and len(stored) == 14 and "lm_head" not in stored  # full dotted names


def test_dora_forward_and_magnitude_init():
    model, layer = peft_layer(use_dora=True, lora_dropout=0.0)
    W, b, A, B, s = arrays(layer)
    magnitude = layer.lora_magnitude_vector["default"].weight
    np.testing.assert_allclose(magnitude.detach().numpy(), ref.dora_weight_norm(W, A, B, s), rtol=1e-6)  # §5.2
    with torch.no_grad():
        magnitude.mul_(1 + torch.rand_like(magnitude))  # g = m / ||W + sBA|| is now != 1
    model.train()  # §5.6: train mode with dropout 0 is the trustworthy path
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = model(x).numpy()
    m = magnitude.detach().numpy()
    want = ref.dora_forward(x.numpy(), W, b, A, B, s, m)
    assert np.abs(want - ref.lora_forward(x.numpy(), W, b, A, B, s)).max() > 1e-2  # DoRA differs from LoRA
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_merge_unmerge_fp32():
    model, layer = peft_layer()
    W, b, A, B, s = arrays(layer)
    layer.merge()
    merged = layer.base_layer.weight.detach().numpy().copy()
    np.testing.assert_allclose(merged, ref.merge_lora(W, A, B, s), atol=1e-6)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.detach().numpy(), ref.unmerge_lora(merged, A, B, s), atol=1e-6)


@pytest.mark.parametrize("dtype,name,share", [(torch.bfloat16, "bfloat16", 0.1), (torch.float16, "float16", 0.02)])
def test_safe_and_unsafe_merge_differ_in_half_precision(dtype, name, share):
    """§4.4: unsafe merge rounds once, safe_merge twice; the reference reproduces both bit for bit."""
    results = {}
    for safe in (False, True):
        model, layer = peft_layer(dtype=dtype)
        assert layer.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype
        make_dyadic(layer)
        W, b, A, B, s = arrays(layer)
        layer.merge(safe_merge=safe)
        results[safe] = layer.base_layer.weight.detach().float().numpy()
        np.testing.assert_array_equal(results[safe], ref.merge_lora(W, A, B, s, dtype=name, safe=safe))
        layer.unmerge()
        np.testing.assert_array_equal(
            layer.base_layer.weight.detach().float().numpy(), ref.unmerge_lora(results[safe], A, B, s, dtype=name)
        )
    assert (results[True] != results[False]).mean() > share


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_dora_merge_and_unmerge(dtype, name):
    model, layer = peft_layer(dtype=dtype, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    W, b, A, B, s = arrays(layer)
    m = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    layer.merge()
    merged = layer.base_layer.weight.detach().float().numpy()
    want, n = ref.merge_dora(W, A, B, s, m, dtype=name)
    ulp = 1e-6 if name == "float32" else 2.0**-7  # bf16: the float32 norm may round either side
    np.testing.assert_allclose(merged, want, rtol=ulp, atol=1e-7)
    if name == "bfloat16":  # only rare elements sit close enough to a rounding boundary to flip
        assert (merged == want).mean() > 0.95
    layer.unmerge()
    np.testing.assert_allclose(
        layer.base_layer.weight.detach().float().numpy(), ref.unmerge_dora(merged, A, B, s, m, n, dtype=name), rtol=ulp, atol=1e-6
    )


def test_bf16_rounding_helper_matches_torch():
    x = torch.randn(1000) * 10
    np.testing.assert_array_equal(bf16.round_to_bf16(x.numpy()), x.to(torch.bfloat16).float().numpy())
