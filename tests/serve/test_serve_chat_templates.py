"""Chat templates of a real transformers 5 checkpoint (chat_template.jinja), rendered token for token as
transformers' `apply_chat_template`; older and overriding template locations; generation_config.json's
end-of-sequence ids and sampling defaults; chat completions served and streamed."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from hf_chat_setup import load_hf_chat, CHAT_TEMPLATE, CONVERSATIONS, build_checkpoint, chat_ids, load_transformers

from adapterhub.errors import ModelLoadError, RequestError
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.runtime.model.tokenizer import Tokenizer
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.openai import parse_chat
from adapterhub.serve.server import serve_in_thread

pytestmark = pytest.mark.compat


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax continuation, one full forward per token (no cache, no stopping)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def served_prompt(tokenizer, messages, **fields) -> list[int]:
    """The prompt token ids the server builds for a chat request body."""
    return parse_chat({"messages": messages, **fields}, tokenizer, 512, 10**6).prompt


def test_transformers_5_writes_the_template_to_chat_template_jinja_and_it_is_read(hf_chat):
    assert (hf_chat / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((hf_chat / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_dir(hf_chat)
    assert tokenizer.has_chat_template and tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.special_tokens["pad_token"] == "<|im_end|>" and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_prompts_are_token_for_token_transformers_apply_chat_template(hf_chat, index):
    hf_tokenizer, _ = load_transformers(hf_chat)
    tokenizer = Tokenizer.from_dir(hf_chat)
    messages = CONVERSATIONS[index]
    expected = chat_ids(hf_tokenizer, messages)
    assert served_prompt(tokenizer, messages) == expected
    assert expected[0] == hf_tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token the template wrote
    assert hf_tokenizer.decode(expected).startswith("<|im_start|>system\n")
    no_prompt = chat_ids(hf_tokenizer, messages, add_generation_prompt=False)
    assert served_prompt(tokenizer, messages, add_generation_prompt=False) == no_prompt != expected
    thinking_off = chat_ids(hf_tokenizer, messages, enable_thinking=False)
    assert served_prompt(tokenizer, messages, chat_template_kwargs={"enable_thinking": False}) == thinking_off
    assert thinking_off != expected  # the variable reached the template


def test_the_template_is_read_from_tokenizer_config_json_and_the_jinja_file_wins(hf_chat, tmp_path):
    hf_tokenizer, _ = load_transformers(hf_chat)
    old = tmp_path / "old"
    shutil.copytree(hf_chat, old)
    (old / "chat_template.jinja").unlink()
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    messages = CONVERSATIONS[2]
    assert served_prompt(Tokenizer.from_dir(old), messages) == chat_ids(hf_tokenizer, messages)
    (old / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    expected = "[hi][  Hello! How can I help?  ][héllo wörld ☕\n  two lines]"
    assert Tokenizer.from_dir(old).apply_chat_template(messages) == expected


def test_an_override_template_renders_as_transformers_with_that_template(hf_chat):
    hf_tokenizer, _ = load_transformers(hf_chat)
    other = "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
    other += "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    tokenizer = Tokenizer.from_dir(hf_chat).with_chat_template(other)
    messages = CONVERSATIONS[1]
    assert served_prompt(tokenizer, messages) == chat_ids(hf_tokenizer, messages, chat_template=other)
    with pytest.raises(ModelLoadError, match="not valid Jinja"):
        Tokenizer.from_dir(hf_chat).with_chat_template("{% for m in messages %}")


def test_a_template_that_refuses_the_messages_is_a_400(hf_chat):
    tokenizer = Tokenizer.from_dir(hf_chat)
    with pytest.raises(RequestError, match="Unknown role: tool"):
        served_prompt(tokenizer, [{"role": "tool", "content": "42"}])
    sandboxed = tokenizer.with_chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="chat template failed"):
        served_prompt(sandboxed, CONVERSATIONS[0])


def test_chat_completions_serve_the_template_and_stream(chat_served, hf_chat):
    hf_tokenizer, _ = load_transformers(hf_chat)
    messages = CONVERSATIONS[2]
    body = {"model": "smol", "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = chat_served.client.post("/v1/chat/completions", json=body).json()
    expected_ids = chat_ids(hf_tokenizer, messages)
    assert reply["usage"]["prompt_tokens"] == len(expected_ids) and reply["model"] == "smol"
    # The same ids sent as a plain completion give the same text: the served prompt is transformers' prompt.
    plain = chat_served.complete(prompt=expected_ids, max_tokens=8, temperature=0, ignore_eos=True).json()
    assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["text"] != ""
    with chat_served.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_generation_config_gives_several_eos_ids_and_the_default_sampling(hf_chat, tmp_path):
    hf_tokenizer, model = load_transformers(hf_chat)
    prompt = hf_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    greedy = greedy_ids(model, prompt, 6)
    # A third end-of-sequence id, the token greedy decoding produces third: the server must stop there (or at
    # an earlier end-of-sequence token).
    path = build_checkpoint(tmp_path / "ckpt", extra_eos=(greedy[2],))
    eos = set(hf_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])) | {greedy[2]}
    stop_at = min(i for i, t in enumerate(greedy) if t in eos)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "top_k": 1, "max_new_tokens": 5}))
    base = load_hf_chat(path)
    assert set(base.stop_token_ids()) == eos
    assert base.sampling_defaults == SamplingDefaults(top_k=1, max_new_tokens=5)
    engine = Engine(base, None, EngineConfig(max_batch=2))
    try:
        with serve_in_thread(create_app(engine, api_key="")) as url:
            def post(**body) -> dict:
                return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, **body}, timeout=60).json()

            stopped = post(temperature=0, max_tokens=6)
            assert stopped["choices"][0]["finish_reason"] == "stop"
            assert stopped["usage"]["completion_tokens"] == stop_at
            assert stopped["choices"][0]["text"] == hf_tokenizer.decode(greedy[:stop_at])
            # ignore_eos: the same tokens, the eos included, up to max_tokens.
            through = post(temperature=0, max_tokens=6, ignore_eos=True)
            assert through["usage"]["completion_tokens"] == 6 and through["choices"][0]["finish_reason"] == "length"
            # Defaults: top_k=1 makes a sampled request greedy; max_new_tokens is the default max_tokens.
            defaulted = post(temperature=1.0, seed=3, ignore_eos=True)
            assert defaulted["usage"]["completion_tokens"] == 5
            greedy_text = post(temperature=0, max_tokens=5, ignore_eos=True)["choices"][0]["text"]
            assert defaulted["choices"][0]["text"] == greedy_text
            # The request's own value wins over the default.
            assert post(temperature=0, max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3
    finally:
        engine.close()
