"""Training data: the three JSONL shapes, which tokens get a loss, and errors that name the bad line."""

from __future__ import annotations

import json

import pytest

from adapterhub.errors import ConfigError
from adapterhub.runtime.model.tiny import byte_tokenizer, tiny_chat
from adapterhub.train.config import TrainConfig
from adapterhub.train.data import IGNORE, collate, file_digest, load_jsonl

BOS, EOS = 256, 257


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_text_prompt_completion_and_messages_label_the_right_tokens(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "ok"}]
    path = _write(tmp_path / "d.jsonl", [{"text": "ab"}, {"prompt": "ab", "completion": "CD"}, {"messages": messages}])
    data = load_jsonl(path, byte_tokenizer(), max_len=512)
    text, pc, chat = data.examples
    assert text.input_ids == (BOS, 97, 98, EOS) and text.labels == text.input_ids
    assert pc.input_ids == (BOS, 97, 98, 67, 68, EOS) and pc.labels == (IGNORE, IGNORE, IGNORE, 67, 68, EOS)
    # The chat: the template's text, byte for byte; labels only on what each assistant message adds.
    rendered = tiny_chat(messages, add_generation_prompt=False)
    assert bytes(t for t in chat.input_ids[1:]) == rendered[3:].encode()  # "<s>" is one token
    trained = bytes(t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE)
    assert trained == b"yo\nok\n"
    assert data.digest == file_digest(path) and data.digest.startswith("sha256:")


def test_max_len_cuts_and_drops_examples_left_without_a_trained_token(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a" * 20, "completion": "b"}, {"prompt": "a", "completion": "bbbb"}])
    data = load_jsonl(path, byte_tokenizer(), max_len=4)
    assert data.dropped == 1 and len(data.examples) == 1
    assert data.examples[0].input_ids == (BOS, 97, 98, 98)


@pytest.mark.parametrize("line, says", [
    ("{not json", "line 2 is not valid JSON"),
    ('{"prompt": "a"}', "line 2: expected an object with 'text'"),
    ('{"text": 3}', "line 2: expected an object"),
    ('[1, 2]', "got list"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: 'messages' has no assistant turn"),
])
def test_a_bad_line_is_named(tmp_path, line, says):
    path = _write(tmp_path / "d.jsonl", [{"text": "fine"}, line])
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("?", r"\?")):
        load_jsonl(path, byte_tokenizer(), max_len=64)


def test_collate_pads_right_and_masks_padding():
    from adapterhub.train.data import Example

    batch = collate([Example((1, 2, 3), (IGNORE, 2, 3)), Example((4,), (4,))], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_checkpointed_config_with_a_misspelt_setting_is_refused_naming_it():
    settings = {**TrainConfig().to_dict(), "learning_rate": 1e-3}
    with pytest.raises(ConfigError, match=r"unknown training settings \['learning_rate'\]"):
        TrainConfig.from_dict(settings)
    assert TrainConfig.from_dict({"r": 8, "target_modules": ["q_proj"]}).target_modules == ("q_proj",)
