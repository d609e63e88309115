"""Sampling against reference/sampling.py, counter-based seeding, and generate / the step API end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.errors import RequestError
from adapterhub.runtime import generate as gen
from adapterhub.runtime.base import Base
from adapterhub.runtime.model.tiny import byte_tokenizer
from model_fixtures import family_config, fp32_model
from reference import sampling as ref

PARAMS = [  # (temperature, top_k, top_p) per row: plain, top-k, top-p, both, greedy
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8), (0.0, 0, 1.0),
]


def _batch(params, seeds=None, offsets=None):
    t, k, p = zip(*params)
    return gen.SamplingBatch.from_params(list(t), list(k), list(p), seeds or [11] * len(params), offsets)


def _logits(B, V, seed=0):
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2
    logits[:, 3] = logits[:, 4]  # a tie, to exercise the tie rules
    return logits


def test_filter_matches_reference_probabilities():
    logits = _logits(len(PARAMS) - 1, 40)
    params = _batch(PARAMS[:-1])
    z = gen._filter(logits / params.temperature[:, None], params.top_k, params.top_p)
    got = torch.softmax(z, -1).double().numpy()
    t, k, p = zip(*PARAMS[:-1])
    want = ref.probabilities(logits.double().numpy(), t, k, p)
    assert (want == 0).any(axis=1)[1:].all()  # top-k / top-p really dropped tokens
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_samples_follow_the_reference_distribution():
    """Many draws of one row (consecutive counters) against reference probabilities: chi-square-like bound."""
    V, n = 12, 6000
    logits = _logits(1, V, seed=3).expand(n, V)
    params = gen.SamplingBatch.from_params([0.8] * n, [6] * n, [0.9] * n, [5] * n, offset=list(range(n)))
    counts = np.bincount(gen.sample(logits, params).numpy(), minlength=V)
    want = ref.probabilities(logits[:1].double().numpy(), 0.8, 6, 0.9)[0] * n
    assert counts[want == 0].sum() == 0
    kept = want > 0
    chi2 = (((counts - want) ** 2)[kept] / want[kept]).sum()
    assert chi2 < 30  # df <= 5; p ~ 1e-5 under the null


def test_greedy_is_argmax_and_sampling_is_seeded_per_row():
    logits = _logits(len(PARAMS), 50, seed=1)
    a = gen.sample(logits, _batch(PARAMS))
    assert a[-1] == logits[-1].argmax()
    assert torch.equal(a, gen.sample(logits, _batch(PARAMS)))  # same seeds, same counters
    # A row's draw depends only on its own seed and counter, not on the rest of the batch.
    alone = gen.sample(logits[2:3], _batch(PARAMS[2:3]))
    assert alone == a[2]
    # The counter advances: 200 draws of one row are not all the same token.
    params = _batch([(1.0, 0, 1.0)])
    draws = {int(gen.sample(logits[:1] * 0.1, params)) for _ in range(200)}
    assert len(draws) > 10 and params.offset.item() == 200


def test_sampling_parameters_are_validated():
    with pytest.raises(RequestError, match="top_p"):
        gen.SamplingBatch.from_params([1.0], [0], [0.0])
    with pytest.raises(RequestError, match="temperature"):
        gen.SamplingBatch.from_params([-1.0])


@pytest.fixture(scope="module")
def base():
    model, _ = fp32_model("llama", seed=4)
    return Base(family_config("llama"), byte_tokenizer(), model)


def test_batched_prompts_of_different_lengths_equal_each_alone(base):
    prompts = ["a", "hello world", "xyz!"]
    batch = base.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, batch):
        assert base.generate([prompt], max_new_tokens=12)[0] == out
    assert len({tuple(o.token_ids) for o in batch}) == 3
    assert base.generate(prompts, max_new_tokens=12) == batch  # greedy is deterministic
    ids = base.tokenizer.encode("xyz!")
    assert base.generate(ids, max_new_tokens=12) == base.generate("xyz!", max_new_tokens=12) == batch[2:]
    assert base.generate(torch.tensor([ids]), max_new_tokens=12) == batch[2:]


def test_seeded_sampling_is_reproducible_and_batch_independent(base):
    prompts = ["one", "two three"]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=123)
    a, b = base.generate(prompts, **kw), base.generate(prompts, **kw)
    assert a == b
    assert base.generate(prompts[1:], **kw)[0] == a[1]
    assert base.generate(prompts, **{**kw, "seed": 124}) != a


def test_stop_tokens_strings_and_lengths(base):
    out = base.generate(["hello"], max_new_tokens=8)[0]
    assert out.finish_reason == "length" and out.completion_tokens == 8 == len(out.token_ids)
    assert out.prompt_tokens == len(base.tokenizer.encode("hello"))
    # A stop string taken from the greedy continuation cuts the text before it.
    stop = out.text[3:5]
    cut = base.generate(["hello"], max_new_tokens=8, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.find(stop)]
    assert cut.token_ids == out.token_ids[: len(cut.token_ids)]
    # The model's eos token stops a row, and is not part of the result.
    eos = out.token_ids[2]
    stopped = gen.generate(base.model, base.tokenizer, [base.tokenizer.encode("hello")], None, max_new_tokens=8,
                           sampling=gen.SamplingBatch.from_params([0.0]), stop_ids=[eos])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[: out.token_ids.index(eos)]


def test_rows_joining_and_leaving_equal_generate(base):
    """The serving engine's pattern: rows are prefilled at different steps and decoded together."""
    prompts = [base.tokenizer.encode(p) for p in ("first prompt", "b", "the third one")]
    greedy = lambda n: gen.SamplingBatch.from_params([0.0] * n)  # noqa: E731
    want = [gen.generate(base.model, base.tokenizer, [p], None, max_new_tokens=6, sampling=greedy(1))[0].token_ids
            for p in prompts]  # no stop tokens: the raw greedy continuation
    cache = base.new_cache(max_batch=4, max_seq=64)
    got = {0: [], 1: [], 2: []}
    row_of = {0: 2, 1: 0, 2: 3}
    active = [0]
    tokens = gen.sample(base.prefill(cache, [row_of[0]], [prompts[0]], None), greedy(1))
    got[0].append(int(tokens[0]))
    for step in range(9):
        if not active:
            break
        if step in (1, 3):  # requests 1 and 2 join
            new = 1 if step == 1 else 2
            first = gen.sample(base.prefill(cache, [row_of[new]], [prompts[new]], None), greedy(1))
            got[new].append(int(first[0]))
            active.append(new)
            tokens = torch.cat([tokens, first])
        rows = torch.tensor([row_of[r] for r in active])
        tokens = gen.sample(base.decode(cache, rows, tokens, None), greedy(len(active)))
        for r, t in zip(active, tokens.tolist()):
            got[r].append(t)
        done = [i for i, r in enumerate(active) if len(got[r]) == 6]
        for i in reversed(done):
            cache.free([row_of[active[i]]])
            del active[i]
            tokens = torch.cat([tokens[:i], tokens[i + 1:]])
    assert [got[i] for i in range(3)] == want


def test_step_api_rejects_bad_input(base):
    cache = base.new_cache(max_batch=2, max_seq=8)
    with pytest.raises(RequestError, match="max_seq"):
        base.prefill(cache, [0], [list(range(9))], None)
    with pytest.raises(RequestError, match="rows"):
        base.prefill(cache, [2], [[1, 2]], None)
    with pytest.raises(RequestError, match=r"\[0, 259\).*1\.\.259"):
        base.prefill(cache, [0], [[1, 259]], None)
    base.prefill(cache, [0], [list(range(8))], None)
    with pytest.raises(RequestError, match="full"):
        base.decode(cache, torch.tensor([0]), torch.tensor([1]), None)


def test_cli_generate_with_and_without_an_adapter(tmp_path):
    from click.testing import CliRunner

    from adapterhub.adapter import random_adapter
    from adapterhub.cli import main
    from adapterhub.runtime import load_base

    base = load_base("tiny", quantize=None)
    adapter = random_adapter(base.module_shapes(), r=8, lora_alpha=64, target_modules=("q_proj", "v_proj", "down_proj"),
                             seed=3)
    adapter.save_peft_dir(tmp_path / "peft")
    want_base = base.generate(["Hello"], max_new_tokens=12)[0].text
    base.add_adapter(str(tmp_path / "peft"), name="a")
    want_adapter = base.generate(["Hello"], adapters=["a"], max_new_tokens=12)[0].text
    assert want_adapter != want_base
    runner = CliRunner()
    plain = runner.invoke(main, ["generate", "--quantize", "none", "-n", "12", "Hello"])
    adapted = runner.invoke(main, ["generate", "--quantize", "none", "-n", "12", "--adapter", str(tmp_path / "peft"), "Hello"])
    assert plain.exit_code == 0 and adapted.exit_code == 0, plain.output + adapted.output
    assert plain.output == want_base + "\n" and adapted.output == want_adapter + "\n"
    missing = runner.invoke(main, ["generate", "--base", str(tmp_path / "nowhere"), "Hello"])
    assert missing.exit_code == 1 and "ModelLoadError" in missing.output


def test_mixed_adapter_batch_equals_each_adapter_alone_and_registry_refs_load(tmp_path):
    from adapterhub.adapter import random_adapter
    from adapterhub.registry import Registry

    model, weights = fp32_model("mistral", seed=6)
    base = Base(family_config("mistral"), byte_tokenizer(), model, max_adapters=3)
    shapes = base.module_shapes()
    lora = random_adapter(shapes, r=4, lora_alpha=32, target_modules=("q_proj", "v_proj", "up_proj"), seed=1)
    dense = {n: weights[n + ".weight"].numpy() for n in shapes}
    dora = random_adapter(shapes, r=8, lora_alpha=32, target_modules=("k_proj", "o_proj", "down_proj"), use_dora=True,
                          seed=2, base_weights=dense)
    registry = Registry(tmp_path / "registry")
    ref = str(registry.push(dora, "dora-task", tags=("prod",)))
    assert base.add_adapter(lora, name="lora") == "lora"
    assert base.add_adapter("dora-task:prod", registry=registry) == "dora-task:prod"
    names = ["lora", None, "dora-task:prod", "lora"]
    prompts = ["abc", "hello there", "x", "a longer prompt here"]
    mixed = base.generate(prompts, adapters=names, max_new_tokens=8, temperature=0.9, seed=3)
    alone = [base.generate([p], adapters=[n], max_new_tokens=8, temperature=0.9, seed=3)[0] for p, n in zip(prompts, names)]
    plain = base.generate(prompts, max_new_tokens=8, temperature=0.9, seed=3)
    assert mixed == alone
    assert mixed[1] == plain[1] and all(mixed[i] != plain[i] for i in (0, 2, 3))  # the adapters change the text
    assert not any(base.pool.is_pinned(n) for n in ("lora", "dora-task:prod"))  # released after the batch
    assert ref.startswith("dora-task@v1")


@pytest.mark.compat
def test_greedy_generation_matches_transformers(checkpoint_dir):
    transformers = pytest.importorskip("transformers")
    from adapterhub.runtime import load_base

    path = checkpoint_dir("qwen2", seed=9)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    for prompt in ("hello", "a longer prompt"):
        ids = base.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
        got = gen.generate(base.model, base.tokenizer, [ids], None, max_new_tokens=12,
                           sampling=gen.SamplingBatch.from_params([0.0]))[0].token_ids
        assert got == want and len(set(got)) > 2
