"""Training data: JSONL files of examples, tokenized into (input_ids, labels) with -100 on untrained tokens.

One JSON object per line, one of three shapes:
    {"text": "..."}                               loss on every token (BOS first, EOS appended)
    {"prompt": "...", "completion": "..."}        loss on the completion and the EOS appended to it only
    {"messages": [{"role": ..., "content": ...}]} the tokenizer's chat template; loss on assistant turns only
Labels follow the transformers convention: labels[t] is the token at t (the loss shifts them), so a
prompt token's label is -100. Examples longer than `max_len` are cut at the end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.errors import ConfigError
from adapterhub.runtime.model.tokenizer import Tokenizer

IGNORE = -100  # the label of a token that gets no loss (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])  # the first token is never predicted


@dataclass(frozen=True)
class Dataset:
    """Tokenized examples of one file, with the file's digest (what lineage records)."""

    path: str
    digest: str  # sha256:<hex> of the file's bytes
    examples: tuple[Example, ...]
    dropped: int = 0  # examples with no trained token left after truncation


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_jsonl(path: str | Path, tokenizer: Tokenizer | None, max_len: int) -> Dataset:
    """Reads and tokenizes every line; a malformed line raises ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data {path} is not a file; give a JSONL file with one example per line")
    if tokenizer is None:
        raise ConfigError("the base has no tokenizer (no tokenizer.json), so text examples cannot be tokenized; "
                          "add a tokenizer.json to the base directory")
    examples, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where} is not valid JSON ({error.msg} at column {error.colno}); "
                                  "write one JSON object per line") from None
            example = _truncate(tokenize(record, tokenizer, where), max_len)
            if example.trained_tokens == 0:
                dropped += 1
                continue
            examples.append(example)
    if not examples:
        raise ConfigError(f"{path} holds no example with a trained token (after cutting to max_len={max_len}); "
                          "check the file, or raise max_len")
    return Dataset(str(path), file_digest(path), tuple(examples), dropped)


def tokenize(record, tokenizer: Tokenizer, where: str) -> Example:
    """One JSON record -> Example (see the module docstring for the three shapes)."""
    keys = sorted(record) if isinstance(record, dict) else None
    if keys == ["text"] and isinstance(record["text"], str):
        ids = tokenizer.encode(record["text"]) + _eos(tokenizer)
        return Example(tuple(ids), tuple(ids))
    if keys == ["completion", "prompt"] and all(isinstance(record[k], str) for k in keys):
        prompt = tokenizer.encode(record["prompt"])
        completion = tokenizer.encode(record["completion"], add_special_tokens=False) + _eos(tokenizer)
        return Example(tuple(prompt + completion), tuple([IGNORE] * len(prompt) + completion))
    if keys == ["messages"] and isinstance(record["messages"], list):
        return _chat(record["messages"], tokenizer, where)
    shown = keys if keys is not None else type(record).__name__
    raise ConfigError(f"{where}: expected an object with 'text', with 'prompt' and 'completion', or with "
                      f"'messages' (string values); got {shown}")


def _eos(tokenizer: Tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _chat(messages: list, tokenizer: Tokenizer, where: str) -> Example:
    """Renders the conversation with the chat template; an assistant turn's tokens are those its message adds
    to the rendering after the template's generation prompt for it."""
    if not tokenizer.has_chat_template:
        raise ConfigError(f"{where}: a 'messages' example needs a chat template, and the base's tokenizer has "
                          "none; use 'prompt' and 'completion' instead")
    if not all(isinstance(m, dict) for m in messages):
        raise ConfigError(f"{where}: every entry of 'messages' must be an object with 'role' and 'content'")
    if not any(m.get("role") == "assistant" for m in messages):
        raise ConfigError(f"{where}: 'messages' has no assistant turn to train on")

    def encode(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False)  # the template owns BOS

    ids = encode(len(messages), False)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start, upto = len(encode(k, True)), encode(k + 1, False)
        end = len(upto)
        if ids[:end] != upto:
            raise ConfigError(f"{where}: the chat template does not render turn {k} as a prefix of the "
                              "conversation, so its tokens cannot be found; use 'prompt' and 'completion'")
        labels[start:end] = ids[start:end]
    return Example(tuple(ids), tuple(labels))


def _truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.labels[:max_len])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (-100 on padding), attention_mask, each (B, T) int64."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
