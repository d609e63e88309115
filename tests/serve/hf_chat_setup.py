"""A real Hugging Face chat checkpoint built in the test, as a user's would be: a small Llama saved by
transformers' `save_pretrained`, with a byte-level BPE tokenizer trained here with the `tokenizers` library
(no download), whose chat template transformers 5 writes to `chat_template.jinja`, and a
`generation_config.json` listing two end-of-sequence ids (end of text and end of turn)."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.runtime import load_base

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time there was a small model that answered questions politely.",
    "You are a helpful assistant. Today is a good day to write tests.",
    "SELECT name FROM users WHERE age > 21 ORDER BY name;",
    "héllo wörld ☕ — naïve café, 東京",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML with a default system prompt (as SmolLM2's), plus what templates in the wild use: namespace, a
# date from strftime_now, raise_exception, tojson, trim, loop variables, {% generation %}, and a variable
# the request may set (chat_template_kwargs).
CHAT_TEMPLATE = """{%- set ns = namespace(has_system=false) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}{%- set ns.has_system = true -%}{%- endif -%}
{%- endfor -%}
{%- if not ns.has_system -%}
<|im_start|>system
You are a helpful assistant. Today is {{ strftime_now('%Y') }}.<|im_end|>
{% endif -%}
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {%- endif -%}
<|im_start|>{{ message['role'] }}{% if message.name is defined %} {{ message.name | tojson }}{% endif %}{{ '\n' }}
{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>
{% endif %}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "All users over 21"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello! How can I help?  "},
     {"role": "user", "name": "ana", "content": "héllo wörld ☕\n  two lines"}],
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_checkpoint(path: Path, extra_eos: tuple[int, ...] = ()) -> Path:
    """Writes the checkpoint; returns its directory. `extra_eos`: more end-of-sequence ids in generation_config.json."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hf = build_tokenizer()
    end_of_text, end_of_turn = hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = LlamaConfig(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=hf.bos_token_id,
                         eos_token_id=end_of_turn, pad_token_id=hf.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=hf.bos_token_id,
                                               eos_token_id=[end_of_text, end_of_turn, *extra_eos])
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return Path(path)


def load_transformers(path: Path):
    """(tokenizer, fp32 model) as transformers loads the directory: the independent side of every comparison."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def chat_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    """transformers' own prompt token ids for a conversation."""
    kwargs = {"add_generation_prompt": True, **kwargs}
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def load_hf_chat(path, max_adapters: int = 4):
    """The chat checkpoint loaded dense in fp32, as the tests compare it to transformers."""
    return load_base(path, quantize=None, compute_dtype=torch.float32, max_adapters=max_adapters)
