"""reference/sampling.py: golden cases, and agreement with Hugging Face's logits warpers."""

import numpy as np
import pytest

from reference.sampling import probabilities, row_probabilities


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log([0.5, 0.3, 0.2])
    np.testing.assert_allclose(row_probabilities(logits, top_p=0.6), [0.625, 0.375, 0.0])
    np.testing.assert_allclose(row_probabilities(logits, top_p=0.5), [1.0, 0.0, 0.0])  # 0.5 already reaches p
    np.testing.assert_allclose(row_probabilities(logits, top_p=0.81), [0.5, 0.3, 0.2])
    np.testing.assert_allclose(row_probabilities(logits, top_p=1e-9), [1.0, 0.0, 0.0])  # never empty


def test_top_k_keeps_ties_and_zero_disables():
    logits = np.array([1.0, 2.0, 2.0, 0.0])
    p = row_probabilities(logits, top_k=1)
    np.testing.assert_allclose(p, [0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(row_probabilities(logits, top_k=0), row_probabilities(logits))
    np.testing.assert_allclose(row_probabilities(logits, top_k=2), [0.0, 0.5, 0.5, 0.0])
    assert row_probabilities(logits, top_k=3)[0] > 0


def test_greedy_ties_go_to_lowest_id_and_temperature_sharpens():
    logits = np.array([0.5, 3.0, 3.0, -1.0])
    np.testing.assert_array_equal(row_probabilities(logits, temperature=0), [0, 1, 0, 0])
    hot, cold = row_probabilities(logits, temperature=2.0), row_probabilities(logits, temperature=0.5)
    assert cold[1] > row_probabilities(logits)[1] > hot[1]
    np.testing.assert_allclose(hot, np.exp(logits / 2) / np.exp(logits / 2).sum())


def test_per_row_parameters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20))
    got = probabilities(logits, temperature=[0.0, 0.7, 1.3], top_k=[0, 5, 0], top_p=[1.0, 1.0, 0.8])
    for b, (t, k, p) in enumerate([(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)]):
        np.testing.assert_array_equal(got[b], row_probabilities(logits[b], t, k, p))
    assert (got[1] > 0).sum() == 5 and (got[0] > 0).sum() == 1


@pytest.mark.compat
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.0, 10, 1.0), (1.5, 20, 0.5), (0.3, 5, 0.95)])
def test_matches_hf_logits_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(4, 64))
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    warpers += [lp.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
    scores = torch.as_tensor(logits)
    for w in warpers:
        scores = w(None, scores)
    hf = torch.softmax(scores, dim=-1).numpy()
    ours = probabilities(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(ours > 0, hf > 0)
    assert ((ours > 0).sum(axis=1) < 64).all()  # filtering really happened
    np.testing.assert_allclose(ours, hf, atol=1e-12)
