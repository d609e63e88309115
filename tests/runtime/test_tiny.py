"""The embedded tiny model and its byte tokenizer; the checkpoint writer every runtime test builds on."""

from __future__ import annotations

import json
import time

import pytest
import torch

from adapterhub.runtime import load_base
from adapterhub.runtime.model.tiny import TINY_CONFIG, byte_tokenizer, random_checkpoint, tiny_weights
from adapterhub.runtime.model.tokenizer import Tokenizer


def test_tiny_builds_fast_and_deterministically():
    load_base("tiny", quantize=None)  # first-use costs (imports, torch op registration) are not the build
    start = time.perf_counter()
    a = load_base("tiny", quantize=None, compute_dtype=torch.float32)
    assert time.perf_counter() - start < 2.0
    b = load_base("tiny", quantize=None, compute_dtype=torch.float32)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    c = a.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        259, 256, 4, 8, 4)
    assert c.intermediate_size % 64 == 0  # whole NF4 blocks per row


def test_tiny_greedy_text_is_printable_and_not_one_repeated_token():
    base = load_base("tiny", quantize=None)
    out = base.generate(["Once upon a time", "def f(x):"], max_new_tokens=24)
    for o in out:
        assert o.completion_tokens == 24 and len(set(o.token_ids)) > 4
        assert all(32 <= t < 127 or t == 10 for t in o.token_ids)


@pytest.mark.parametrize("text", ["hello", "héllo wörld ✓ 日本", "a\nb\tc", ""])
def test_byte_tokenizer_round_trips_utf8(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256 and ids[1:] == list(text.encode())
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.eos_token_id == 257 and tok.vocab_size == 259


def test_incomplete_utf8_decodes_to_replacement_char():
    tok = byte_tokenizer()
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_chat_template_python_and_jinja_agree(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    tiny = byte_tokenizer()
    assert tiny.has_chat_template
    want = "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"  # the template owns BOS, as HF templates do
    assert tiny.apply_chat_template(messages) == want
    assert tiny.encode(want, add_special_tokens=False) == tiny.encode(want[3:])  # one BOS either way
    pytest.importorskip("jinja2")
    tiny.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template(messages) == want
    assert loaded.encode("x é") == tiny.encode("x é") and loaded.eos_token_id == 257


def test_no_chat_template_gives_none(tmp_path):
    tiny = byte_tokenizer()
    Tokenizer(tiny.backend, bos_token="<s>", eos_token="</s>").save(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template and tok.apply_chat_template([{"role": "user", "content": "x"}]) is None



def test_save_keeps_every_named_special_token_for_a_template_and_transformers(tmp_path):
    tiny = byte_tokenizer()
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ pad_token }}{% endfor %}"
    Tokenizer(tiny.backend, bos_token="<s>", eos_token="</s>", chat_template=template,
              special_tokens={"pad_token": "</s>", "unk_token": "<s>"}).save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.special_tokens["pad_token"] == "</s>" and loaded.special_tokens["unk_token"] == "<s>"
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<s>hi</s>"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.pad_token, hf.unk_token, hf.eos_token) == ("</s>", "<s>", "</s>")

def test_checkpoint_of_tiny_loads_to_the_same_model(tmp_path):
    path = random_checkpoint(tmp_path / "tiny", max_shard_bytes=2_000_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from_dir = load_base(path, quantize=None, compute_dtype=torch.float32)
    embedded = load_base("tiny", quantize=None, compute_dtype=torch.float32)
    assert from_dir.config == TINY_CONFIG
    ids = torch.tensor([embedded.tokenizer.encode("same model")])
    torch.testing.assert_close(from_dir(ids), embedded(ids), rtol=0, atol=0)
    w = tiny_weights()["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(from_dir.model.get_submodule("model.layers.3.mlp.down_proj").dequantized_weight(), w)
