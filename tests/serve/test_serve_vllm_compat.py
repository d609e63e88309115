"""What vLLM users rely on: the runtime adapter routes (load_lora_adapter / unload_lora_adapter) and
--lora-modules, --served-model-name, serve --quantize / --chat-template, generate --dtype, a busy port
refused before the model loads, and the official `openai` client against the live server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_chat_setup import CONVERSATIONS, chat_ids, load_hf_chat, load_transformers
from serving_setup import wait_until_serving

from adapterhub.adapter import random_adapter
from adapterhub.cli import main

pytestmark = pytest.mark.compat
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peft_dir(hf_chat, tmp_path_factory) -> Path:
    """A PEFT adapter directory for the chat checkpoint (non-zero lora_B)."""
    shapes = load_hf_chat(hf_chat).module_shapes()
    path = tmp_path_factory.mktemp("peft") / "tone"
    random_adapter(shapes, r=8, seed=9, target_modules=("q_proj", "v_proj", "down_proj")).save_peft_dir(path)
    return path


def offline_text(hf_chat, adapter_dir: Path | None, prompt: list[int], n: int) -> str:
    base = load_hf_chat(hf_chat)
    name = base.add_adapter(adapter_dir, name="a") if adapter_dir else None
    return base.generate([prompt], adapters=[name], max_new_tokens=n)[0].text


def test_load_and_unload_lora_adapter_routes_then_serve(chat_served, hf_chat, peft_dir, hf):
    tokenizer, _ = hf
    client, prompt = chat_served.client, tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "tone", "lora_path": str(peft_dir)})
    assert loaded.status_code == 200, loaded.text
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "hfsql"}).status_code == 200
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    tone = chat_served.complete(model="tone", **body).json()
    assert tone["model"] == "tone"
    assert tone["choices"][0]["text"] == offline_text(hf_chat, peft_dir, prompt, 8)
    assert tone["choices"][0]["text"] != chat_served.complete(**body).json()["choices"][0]["text"]  # it adapts
    assert chat_served.complete(model="sql", **body).json()["choices"][0]["text"] == \
        chat_served.complete(model="hfsql", **body).json()["choices"][0]["text"]
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["smol"]["kind"] == "base" and listed["tone"]["parent"] == "smol" and listed["tone"]["kind"] == "lora"
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "tone", "lora_path": str(peft_dir)})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "tone"}).status_code == 200
    gone = chat_served.complete(model="tone", **body)
    assert gone.status_code == 404, gone.text
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "tone"}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
    bad = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(peft_dir), "extra": 1})
    assert bad.status_code == 400 and "'extra'" in bad.json()["error"]["message"]


@pytest.fixture(scope="module")
def hf(hf_chat):
    return load_transformers(hf_chat)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_busy_port_fails_in_a_second_before_the_model_loads(monkeypatch, hf_chat, tmp_path):
    import adapterhub.runtime

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path))
    loads = []
    monkeypatch.setattr(adapterhub.runtime, "load_base", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        result = CliRunner().invoke(main, ["serve", "--base", str(hf_chat), "--port", str(port)])
        elapsed = time.monotonic() - start
    assert result.exit_code == 1 and loads == [] and elapsed < 5
    message = result.output.strip()
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "--port" in message


def test_serve_command_with_vllm_options_and_the_openai_client(hf_chat, peft_dir, tmp_path, hf):
    openai = pytest.importorskip("openai")
    tokenizer, _ = hf
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERHUB_API_KEY"}
    env["ADAPTERHUB_HOME"] = str(tmp_path / "registry")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--base", str(hf_chat),
               "--port", str(port), "--quantize", "none",
               "--dtype", "float32", "--served-model-name", "smol", "--lora-modules", f"tone={peft_dir}",
               "--chat-template", str(template), "--max-batch", "4", "--max-seq", "256"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list()][:2] == ["smol", "tone"]
        messages = CONVERSATIONS[0]
        reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=5, temperature=0,
                                               logprobs=True, top_logprobs=2, n=2, extra_body={"ignore_eos": True})
        assert reply.usage.prompt_tokens == len(  # the override's prompt, not the model's template's
            chat_ids(tokenizer, messages, chat_template=template.read_text()))
        assert reply.usage.prompt_tokens != len(chat_ids(tokenizer, messages))
        assert len(reply.choices) == 2 and reply.choices[0].message.content == reply.choices[1].message.content
        assert len(reply.choices[0].logprobs.content) == 5
        assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2
        stream = client.chat.completions.create(model="tone", messages=messages, max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 5
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = client.chat.completions.create(model="tone", messages=messages, max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert streamed == whole.choices[0].message.content
        completion = client.completions.create(model="smol", prompt="Once upon", max_tokens=4, temperature=0,
                                               logprobs=3, extra_body={"ignore_eos": True})
        assert len(completion.choices[0].logprobs.token_logprobs) == 4
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(model="smol", messages=messages, max_tokens=2,
                                           tools=[{"type": "function", "function": {"name": "f"}}])
    finally:
        process.terminate()
        process.wait(30)


def test_generate_dtype_float32_dense_equals_transformers_greedy(hf_chat, hf):
    tokenizer, model = hf
    prompt = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    result = CliRunner().invoke(main, ["generate", "--base", str(hf_chat), "--quantize", "none", "--dtype", "float32",
                                       "--token-ids", ",".join(map(str, prompt)), "-n", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    expected = ids[len(prompt):]
    stops = set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    assert out["token_ids"] == expected[:cut]
    assert CliRunner().invoke(main, ["generate", "--dtype", "float8", "x"]).exit_code == 2
