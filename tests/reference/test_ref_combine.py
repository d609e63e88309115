"""Adapter combination: runtime/lora_math vs reference/combine vs PEFT add_weighted_adapter."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adapterhub.errors import MergeError  # noqa: E402
from adapterhub.runtime.adapters import lora_math  # noqa: E402
from reference import combine  # noqa: E402

WEIGHTS, SCALINGS, DENSITY = [0.7, -0.4], [2.0, 0.5], 0.5


def _factors(seed=0, r=4, din=12, dout=10):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, din, generator=g) for _ in range(2)]
    Bs = [torch.randn(dout, r, generator=g) for _ in range(2)]
    return As, Bs


def _np(ts):
    return [t.numpy() for t in ts]


def _masks(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full_like(t, DENSITY), generator=g).numpy() for t in tensors]


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_combine_factors_matches_reference(method):
    As, Bs = _factors()
    A, B = lora_math.combine_factors(
        As, Bs, SCALINGS, WEIGHTS, method, density=DENSITY, generator=torch.Generator().manual_seed(5)
    )
    masks = None
    if method.startswith("dare"):
        drawn = _masks(As + Bs, seed=5)  # lora_math draws the A masks first, then the B masks
        masks = (drawn[:2], drawn[2:])
    rA, rB = combine.combine_factors(_np(As), _np(Bs), SCALINGS, WEIGHTS, method, DENSITY, keep_masks=masks)
    np.testing.assert_allclose(A.numpy(), rA, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(B.numpy(), rB, rtol=1e-6, atol=1e-6)
    if method != "linear":  # pruning really removed entries
        assert (rA == 0).mean() > 0.2


def test_ties_elects_sign_and_averages_agreeing_entries():
    t1 = torch.tensor([3.0, -1.0, 2.0, 0.5])
    t2 = torch.tensor([-1.0, -2.0, 1.0, 4.0])
    got = lora_math.ties([t1, t2], [1.0, 1.0], density=1.0)
    # entry 0: sum 2 > 0 -> only t1 agrees; 1: both negative; 2: both positive; 3: both positive
    np.testing.assert_allclose(got.numpy(), [3.0, -1.5, 1.5, 2.25])
    trimmed = lora_math.ties([t1, t2], [1.0, 1.0], density=0.5)  # keeps 3, 2 of t1 and -2, 4 of t2
    np.testing.assert_allclose(trimmed.numpy(), [3.0, -2.0, 2.0, 4.0])
    votes = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert lora_math.ties(votes, [1, 1, 1], 1.0, "total").item() == 3.0  # sum 1 >= 0: + wins
    assert lora_math.ties(votes, [1, 1, 1], 1.0, "frequency").item() == -1.0  # two of three are -
    assert combine.ties([v.numpy() for v in votes], [1, 1, 1], 1.0, "frequency")[0] == -1.0


def test_dare_rescales_kept_entries_and_is_seeded():
    t = torch.arange(1.0, 2001.0)
    a = lora_math.dare([t], [1.0], 0.25, generator=torch.Generator().manual_seed(0))
    b = lora_math.dare([t], [1.0], 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    kept = a != 0
    assert 0.2 < kept.float().mean() < 0.3
    torch.testing.assert_close(a[kept], t[kept] * 4)


def test_cat_is_exact_and_svd_is_best_rank_r():
    As, Bs = _factors(r=3)
    A, B = lora_math.combine_cat(As, Bs, SCALINGS, WEIGHTS)
    assert A.shape == (6, 12) and B.shape == (10, 6)
    want = sum(w * lora_math.delta_weight(a, b, s) for a, b, s, w in zip(As, Bs, SCALINGS, WEIGHTS))
    torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-5)
    rA, rB = combine.combine_cat(_np(As), _np(Bs), SCALINGS, WEIGHTS)
    np.testing.assert_allclose(rB @ rA, want.numpy(), rtol=1e-5, atol=1e-5)
    sA, sB = lora_math.combine_svd(As, Bs, SCALINGS, WEIGHTS, r=6)  # rank 6 holds the whole sum
    torch.testing.assert_close(sB @ sA, want, rtol=1e-4, atol=1e-4)
    sA, sB = lora_math.svd_to_lora(want, 2)
    S = torch.linalg.svdvals(want)
    err = torch.linalg.matrix_norm(want - sB @ sA)
    assert err == pytest.approx(float(S[2:].square().sum().sqrt()), rel=1e-4)  # Eckart-Young
    nA, nB = combine.svd_to_lora(want.numpy(), 2)
    np.testing.assert_allclose(nB @ nA, (sB @ sA).numpy(), atol=1e-4)


def test_bad_method_and_density_raise():
    As, Bs = _factors()
    with pytest.raises(MergeError, match="unknown combination method"):
        lora_math.combine_factors(As, Bs, SCALINGS, WEIGHTS, "average")
    with pytest.raises(MergeError, match="density"):
        lora_math.combine_factors(As, Bs, SCALINGS, WEIGHTS, "ties")
    with pytest.raises(MergeError, match="majority_sign_method"):
        lora_math.combine_factors(As, Bs, SCALINGS, WEIGHTS, "ties", density=0.5, majority_sign_method="mode")


# --- against PEFT -------------------------------------------------------------------------------


def _peft_model():
    peft = pytest.importorskip("peft")
    from hf_tiny import build_hf_model

    torch.manual_seed(0)
    model = peft.get_peft_model(
        build_hf_model("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="u",
    )
    model.add_adapter("v", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False))
    return model


def _layers(model):
    return [(n, m) for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "u" in m.lora_A]


@pytest.mark.compat
@pytest.mark.parametrize(
    "method",
    ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties", "cat", "svd", "ties_svd", "dare_ties_svd"],
)
def test_matches_peft_add_weighted_adapter(method, monkeypatch):
    model = _peft_model()
    # PEFT's dare draws from the global generator after initialising the new adapter (which also draws):
    # record the generator state at its first draw and replay the same stream from a private generator.
    states, bernoulli = [], torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda *a, **k: states.append(torch.get_rng_state()) or bernoulli(*a, **k))
    model.add_weighted_adapter(["u", "v"], WEIGHTS, "m", combination_type=method, density=DENSITY, svd_rank=4)
    monkeypatch.undo()
    g = torch.Generator()
    if states:
        g.set_state(states[0])
    for _, layer in _layers(model):
        As = [layer.lora_A[n].weight.detach() for n in "uv"]
        Bs = [layer.lora_B[n].weight.detach() for n in "uv"]
        scalings = [layer.scaling[n] for n in "uv"]
        assert scalings[1] == pytest.approx(2 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
        peft_A, peft_B = layer.lora_A["m"].weight.detach(), layer.lora_B["m"].weight.detach()
        assert layer.scaling["m"] == 1.0
        if method == "cat":
            A, B = lora_math.combine_cat(As, Bs, scalings, WEIGHTS)
        elif method.endswith("svd"):
            delta_method = method[: -len("_svd")] if method != "svd" else "linear"
            A, B = lora_math.combine_svd(As, Bs, scalings, WEIGHTS, r=4, method=delta_method, density=DENSITY, generator=g)
            torch.testing.assert_close(B @ A, peft_B @ peft_A, rtol=1e-4, atol=1e-5)  # factors: sign-ambiguous
            continue
        else:
            A, B = lora_math.combine_factors(As, Bs, scalings, WEIGHTS, method, density=DENSITY, generator=g)
        torch.testing.assert_close(A, peft_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(B, peft_B, rtol=1e-6, atol=1e-7)
