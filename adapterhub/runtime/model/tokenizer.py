"""`Tokenizer`: a `tokenizers.Tokenizer` plus what the files beside it add (special tokens, chat template).

Chat templates of HF checkpoints are Jinja, read and rendered as transformers does (`chat_template.py`).
The embedded tiny model uses a fixed Python template instead.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from adapterhub.errors import ModelLoadError, RequestError
from adapterhub.runtime.model.chat_template import SPECIAL_TOKEN_NAMES, ChatTemplate, read_chat_template

Messages = Sequence[dict]
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, render_chat: Callable[[Messages, bool], str] | None = None,
                 special_tokens: dict[str, str] | None = None):
        """chat_template: the Jinja source (saved with the tokenizer); render_chat: a Python renderer of the
        same format, used instead of Jinja when given (the tiny model's). special_tokens: the named special
        tokens a template sees (bos_token, eos_token, pad_token, ...), bos and eos included by default."""
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        self.chat_template, self._render_chat = chat_template, render_chat
        self._template = None if chat_template is None else ChatTemplate(chat_template, self.special_tokens)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Reads `tokenizer.json` and, when present, `tokenizer_config.json` (special tokens; `special_tokens_map.json`
        for older writers) and the chat template (`chat_template.read_chat_template`)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(
                f"{path} has no tokenizer.json; adapterhub reads fast (tokenizers) tokenizers only. "
                "Save one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
            )
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        legacy = _read_json(path / "special_tokens_map.json")
        special = {name: _token_text(config.get(name, legacy.get(name))) for name in SPECIAL_TOKEN_NAMES}
        return cls(tok, bos_token=special["bos_token"], eos_token=special["eos_token"],
                   chat_template=read_chat_template(path, config), special_tokens=special)

    def with_chat_template(self, source: str) -> Tokenizer:
        """This tokenizer with another Jinja chat template (`serve --chat-template FILE`)."""
        return Tokenizer(self._tok, bos_token=self.bos_token, eos_token=self.eos_token, chat_template=source,
                         special_tokens=self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): exact for byte-level BPE and for
        SentencePiece byte fallback (`<0xE2>`), where one token may be part of a character; otherwise the
        UTF-8 of its decoded text."""
        piece = self._tok.id_to_token(token_id) or ""
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if self._is_byte_level and all(ch in self._byte_decoder for ch in piece):
            return bytes(self._byte_decoder[ch] for ch in piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    @property
    def has_chat_template(self) -> bool:
        return self._render_chat is not None or self._template is not None

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True, **kwargs) -> str | None:
        """The prompt text for a conversation, or None when this tokenizer has no template. kwargs: extra
        variables for the template (a request's `chat_template_kwargs`, e.g. enable_thinking)."""
        if not self.has_chat_template:
            return None
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise RequestError(f"chat message {m!r} needs a 'role' and a string 'content'")
        if self._render_chat is not None:
            return self._render_chat(messages, add_generation_prompt)
        return self._template.render(messages, add_generation_prompt, **kwargs)

    def save(self, path: str | Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (every named special token it was read with, and the
        Jinja chat template): `Tokenizer.load` and transformers' AutoTokenizer read back the same tokens."""
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        named = {name: text for name, text in self.special_tokens.items() if text is not None}
        config = {**named, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @cached_property
    def _is_byte_level(self) -> bool:
        return "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder") or {})

    @cached_property
    def _byte_decoder(self) -> dict[str, int]:
        return {ch: b for b, ch in bytes_to_unicode().items()}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # AddedToken dicts or plain strings
