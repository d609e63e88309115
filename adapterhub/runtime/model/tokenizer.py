"""`Tokenizer`: a `tokenizers.Tokenizer` plus what `tokenizer_config.json` adds (bos/eos, chat template).

Chat templates of HF checkpoints are Jinja; they are rendered with jinja2 when it is importable
(it is not a declared dependency). The embedded tiny model uses a fixed Python template instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from adapterhub.errors import ModelLoadError, RequestError

Messages = Sequence[dict]


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, render_chat: Callable[[Messages, bool], str] | None = None):
        """chat_template: the Jinja source (saved with the tokenizer); render_chat: a Python renderer of the
        same format, used instead of Jinja when given (the tiny model's)."""
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
        self.chat_template, self._render_chat = chat_template, render_chat

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Reads `tokenizer.json` and, when present, `tokenizer_config.json`."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(
                f"{path} has no tokenizer.json; adapterhub reads fast (tokenizers) tokenizers only. "
                "Save one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
            )
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")),
                   chat_template=template)

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

    @property
    def has_chat_template(self) -> bool:
        return self._render_chat is not None or (self.chat_template is not None and _jinja() is not None)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str | None:
        """The prompt text for a conversation, or None when this tokenizer has no usable template."""
        if not self.has_chat_template:
            return None
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise RequestError(f"chat message {m!r} needs a 'role' and a string 'content'")
        if self._render_chat is not None:
            return self._render_chat(messages, add_generation_prompt)
        # Templates come with downloaded models: render them sandboxed, as transformers does.
        env = _jinja().sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def save(self, path: str | Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos and the Jinja chat template)."""
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _raise_template_error(message: str):
    raise RequestError(f"the chat template refused the messages: {message}")


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # AddedToken dicts or plain strings


def _jinja():
    try:
        import jinja2
        import jinja2.sandbox  # noqa: F401
    except ImportError:
        return None
    return jinja2
