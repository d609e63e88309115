"""The OpenAI sampling surface on a real transformers checkpoint: logprobs (completions and chat, streamed
too) against log_softmax of transformers' own fp32 logits; presence / frequency / repetition penalties
against reference/sampling.py and a hand-computed case; n choices; every unsupported field refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_chat_setup import load_hf_chat, CONVERSATIONS, chat_ids, load_transformers

from adapterhub.serve.logits import Penalties, token_logprobs
from adapterhub.serve.requests import SamplingParams
from reference import sampling as ref

pytestmark = pytest.mark.compat
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def hf(hf_chat):
    return load_transformers(hf_chat)


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits at every position.  # (T, V)"""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def reference_greedy(model, prompt: list[int], n: int, **penalties) -> list[int]:
    """Greedy decoding on transformers' logits with reference/sampling.py's penalties."""
    ids, counts = list(prompt), np.zeros(model.config.vocab_size)
    for _ in range(n):
        z = ref.apply_penalties(logits_of(model, ids)[-1].numpy(), counts, prompt_tokens=prompt, **penalties)
        ids.append(int(np.argmax(z)))
        counts[ids[-1]] += 1
    return ids[len(prompt):]


def test_penalties_match_openai_definition_on_a_worked_example():
    logits = np.array([2.0, 1.0, -1.0, 0.5, 3.0])
    counts = np.array([3, 0, 1, 0, 0])  # token 0 generated three times, token 2 once
    # logit[j] -= c[j] * frequency + (c[j] > 0) * presence, with frequency 0.5, presence 0.25:
    expected = [2.0 - 1.5 - 0.25, 1.0, -1.0 - 0.5 - 0.25, 0.5, 3.0]
    got = ref.apply_penalties(logits, counts, presence_penalty=0.25, frequency_penalty=0.5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # repetition 2 over prompt {3} and output {0, 2}: positive logits halved, negative doubled, then the rest.
    got = ref.apply_penalties(logits, counts, 0.25, 0.5, repetition_penalty=2.0, prompt_tokens=[3])
    np.testing.assert_allclose(got, [1.0 - 1.75, 1.0, -2.0 - 0.75, 0.25, 3.0], rtol=0, atol=1e-12)


def test_the_servers_penalties_and_logprobs_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    V, rows = 50, torch.tensor([2, 0, 1])
    logits = torch.randn(3, V, generator=g) * 3
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=-0.3, repetition_penalty=1.4, logprobs=4),
              SamplingParams(), SamplingParams(frequency_penalty=1.1, logprobs=0)]
    prompts = [[1, 2, 3], [4], [5, 5, 6]]
    penalties = Penalties(max_batch=3, vocab_size=V)
    for row, prompt, p in zip(rows.tolist(), prompts, params):
        penalties.start(row, prompt, p, "cpu")
    generated = [[7, 7, 1, 9], [3], [7, 8, 8, 8]]
    for step in range(4):
        present = [b for b in range(3) if step < len(generated[b])]
        penalties.record(rows[present], torch.tensor([generated[b][step] for b in present]), params)
    got = penalties.apply(logits, rows, params)
    for b, p in enumerate(params):
        counts = np.bincount(generated[b], minlength=V)
        if not p.has_penalties:
            counts = np.zeros(V)
        expected = ref.apply_penalties(logits[b].numpy(), counts, p.presence_penalty, p.frequency_penalty,
                                       p.repetition_penalty, prompts[b] if p.has_penalties else ())
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-6, atol=1e-5)
    assert not torch.equal(got[0], logits[0])  # the penalties did something
    tokens = torch.tensor([4, 9, 11])
    out = token_logprobs(logits, tokens, params)
    assert out[1] is None and out[2].top == ()
    lp = ref.log_probabilities(logits[0].numpy())
    assert out[0].token == 4 and abs(out[0].logprob - lp[4]) < 1e-5
    assert [i for i, _ in out[0].top] == [i for i, _ in ref.top_log_probabilities(logits[0].numpy(), 4)]



def test_top_logprobs_break_ties_by_lower_id_as_the_reference():
    # Logits with many exact ties around the k-th place: topk alone would return tied ids in any order.
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0, 1.0, -3.0, 2.0, 1.0, 0.5],
                           [1.0] * 10])
    params = [SamplingParams(logprobs=k) for k in (5, 3)]
    out = token_logprobs(logits, torch.tensor([6, 9]), params)
    for b, k in enumerate((5, 3)):
        expected = ref.top_log_probabilities(logits[b].numpy(), k)
        assert [i for i, _ in out[b].top] == [i for i, _ in expected]
        np.testing.assert_allclose([v for _, v in out[b].top], [v for _, v in expected], rtol=1e-6)

def test_completion_logprobs_are_log_softmax_of_transformers_logits(chat_served, hf, hf_chat):
    tokenizer, model = hf
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 5, "ignore_eos": True}
    reply = chat_served.complete(**body).json()
    generated = reference_greedy(model, prompt, 6)
    logprobs = reply["choices"][0]["logprobs"]
    lp = torch.log_softmax(logits_of(model, prompt + generated)[len(prompt) - 1: -1], dim=-1)  # (6, V)
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in generated]
    np.testing.assert_allclose(logprobs["token_logprobs"], [float(lp[i, t]) for i, t in enumerate(generated)],
                               rtol=0, atol=1e-4)
    # And of the runtime's own full forward, `base(...)`, on a separately loaded base (no KV cache, no batching).
    with torch.no_grad():
        full = load_hf_chat(hf_chat)(torch.tensor([prompt + generated]))[0, len(prompt) - 1: -1].double()
    ours = torch.log_softmax(full, dim=-1)
    np.testing.assert_allclose(logprobs["token_logprobs"], [float(ours[i, t]) for i, t in enumerate(generated)],
                               rtol=0, atol=1e-5)
    for i, top in enumerate(logprobs["top_logprobs"]):
        values, ids = lp[i].topk(5)
        # Keyed by text, as OpenAI's shape is: tokens with one text (parts of a character) keep the last value.
        expected = {tokenizer.decode([t]): float(v) for t, v in zip(ids.tolist(), values)}
        expected[tokenizer.decode([generated[i]])] = float(lp[i, generated[i]])
        assert set(top) == set(expected)
        np.testing.assert_allclose([top[k] for k in expected], list(expected.values()), rtol=0, atol=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))
    shown = [text for text, t in zip(logprobs["tokens"], generated) if t not in tokenizer.all_special_ids]
    assert "".join(shown) == reply["choices"][0]["text"]
    # Streamed: the chunks carry the same entries, in order.
    with chat_served.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == logprobs["tokens"]
    assert sum((s["text_offset"] for s in streamed), []) == offsets
    np.testing.assert_allclose(sum((s["token_logprobs"] for s in streamed), []), logprobs["token_logprobs"],
                               rtol=0, atol=1e-6)


def test_chat_logprobs_in_openai_shape_streamed_and_not(chat_served, hf):
    tokenizer, model = hf
    messages = CONVERSATIONS[0]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "ignore_eos": True}
    reply = chat_served.client.post("/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    prompt = chat_ids(tokenizer, messages)
    generated = reference_greedy(model, prompt, 5)
    lp = torch.log_softmax(logits_of(model, prompt + generated)[len(prompt) - 1: -1], dim=-1)
    assert [e["token"] for e in content] == [tokenizer.decode([t]) for t in generated]
    for i, entry in enumerate(content):
        assert abs(entry["logprob"] - float(lp[i, generated[i]])) < 1e-4
        values, ids = lp[i].topk(3)
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([t]) for t in ids.tolist()]
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], values.tolist(), atol=1e-4)
    # The bytes of the tokens the text shows (special tokens are skipped in it) are the text's UTF-8.
    shown = b"".join(bytes(e["bytes"]) for e, t in zip(content, generated) if t not in tokenizer.all_special_ids)
    assert shown.decode("utf-8", "replace") == reply["choices"][0]["message"]["content"]
    with chat_served.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]), [])
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    without = chat_served.client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert without.json()["choices"][0]["logprobs"] is None


def test_presence_frequency_and_repetition_penalties_end_to_end(chat_served, hf):
    tokenizer, model = hf
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    # Negative presence / frequency penalties favour repeats: with random weights the greedy text has none, so
    # positive ones would change nothing here (the worked example above covers their sign).
    penalties = {"presence_penalty": -1.0, "frequency_penalty": -2.0, "repetition_penalty": 1.1}
    expected = reference_greedy(model, prompt, 12, **penalties)
    assert expected != reference_greedy(model, prompt, 12)  # the penalties change the greedy text
    reply = chat_served.complete(prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                                 **penalties).json()
    assert reply["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected]
    # Without penalties: plain greedy, in each of n rows.
    plain = chat_served.complete(prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True, n=2).json()
    assert [c["text"] for c in plain["choices"]] == [tokenizer.decode(reference_greedy(model, prompt, 12))] * 2


UNSUPPORTED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("tool_choice", {"tool_choice": "auto"}),
    ("functions", {"functions": [{"name": "f"}]}),
    ("function_call", {"function_call": "auto"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("echo", {"echo": True}),
    ("suffix", {"suffix": "!"}),
    ("best_of", {"best_of": 3}),
    ("min_p", {"min_p": 0.1}),
    ("audio", {"audio": {"voice": "alloy"}}),
    ("no_such_field", {"no_such_field": 1}),
    ("messages[0].tool_calls", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]}),
    ("'n'", {"n": 0}),
    ("'n'", {"n": 17}),
    ("'logprobs'", {"logprobs": 3}),  # chat: a boolean
    ("'top_logprobs'", {"logprobs": True, "top_logprobs": 21}),
    ("'top_logprobs'", {"top_logprobs": 2}),  # without logprobs: true
    ("'presence_penalty'", {"presence_penalty": 2.5}),
    ("'repetition_penalty'", {"repetition_penalty": 0}),
    ("'ignore_eos'", {"ignore_eos": "yes"}),
    ("'chat_template_kwargs'", {"chat_template_kwargs": {"messages": []}}),
]


@pytest.mark.parametrize("name, fields", UNSUPPORTED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(UNSUPPORTED)])
def test_each_unsupported_field_is_a_400_naming_it(chat_served, name, fields):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    response = chat_served.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert name.strip("'") in response.json()["error"]["message"]


def test_off_values_of_known_fields_are_accepted(chat_served):
    off = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "user": "u1",
           "parallel_tool_calls": False, "stream_options": None, "best_of": 1}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **off}
    assert chat_served.client.post("/v1/chat/completions", json=body).status_code == 200
    completion = chat_served.complete(prompt="hi", max_tokens=2, logprobs=None, echo=False, suffix=None, logit_bias={})
    assert completion.status_code == 200
    assert chat_served.complete(prompt="hi", max_tokens=2, logprobs=True).status_code == 400  # an int here


def test_n_choices_greedy_identical_seeded_reproducible(chat_served):
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    greedy = chat_served.complete(**body, n=3, temperature=0).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in greedy["choices"]}) == 1
    assert greedy["usage"]["completion_tokens"] == 18
    first = chat_served.complete(**body, n=3, temperature=1.5, seed=11).json()["choices"]
    again = chat_served.complete(**body, n=3, temperature=1.5, seed=11).json()["choices"]
    assert [c["text"] for c in first] == [c["text"] for c in again]
    assert len({c["text"] for c in first}) > 1  # choice i samples with seed + i
    alone = chat_served.complete(**body, temperature=1.5, seed=12).json()["choices"][0]["text"]
    assert alone == first[1]["text"]
    chat = {"messages": CONVERSATIONS[0], "max_tokens": 4, "n": 2, "temperature": 1.5, "seed": 11, "ignore_eos": True}
    whole = chat_served.client.post("/v1/chat/completions", json=chat).json()
    with chat_served.client.stream("POST", "/v1/chat/completions",
                                   json={**chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    for index in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == index)
        assert text == whole["choices"][index]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
