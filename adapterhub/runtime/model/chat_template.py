"""Chat templates: where a checkpoint keeps its Jinja template, and rendering it as transformers'
`apply_chat_template` does, so that a served chat prompt is token for token the one transformers builds.

Where (transformers 5.x `tokenization_utils_base.py`): `chat_template.jinja` beside the tokenizer (what
transformers >= 5 writes), else `chat_template.json` (`{"chat_template": ...}`, processors), else the
`chat_template` key of `tokenizer_config.json` (older writers): a string, or a list of named templates of
which "default" is used. The file takes precedence (docs/semantics.md §10).

How (transformers 5.x `utils/chat_template_utils.py`): a sandboxed, immutable Jinja environment with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson` that neither escapes HTML nor
non-ASCII, the globals `raise_exception` and `strftime_now`, and the `{% generation %}` block (which
marks assistant text for training masks and renders its body unchanged). A template sees `messages`
(keys whose value is null dropped), `tools` and `documents` (null here), `add_generation_prompt`, the
tokenizer's named special tokens as strings (`bos_token`, `eos_token`, ...), and the request's extra
keyword arguments. The rendered text is then encoded without adding special tokens: templates write
their own BOS.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from adapterhub.errors import ModelLoadError, RequestError

TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers passes to a template (`SPECIAL_TOKENS_ATTRIBUTES`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_chat_template(path: Path, tokenizer_config: Mapping) -> str | None:
    """The Jinja source a tokenizer directory holds, in transformers' order of precedence; None without one."""
    if (path / TEMPLATE_FILE).is_file():
        return (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    else:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"the chat template in {path} is a {type(template).__name__}, not Jinja text; "
                             f"save it as {TEMPLATE_FILE}")
    return template


class ChatTemplate:
    """One compiled template; `render` is safe to call from several threads."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], origin: str = "the chat template"):
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:  # validated once, when the tokenizer is loaded
            raise ModelLoadError(f"{origin} is not valid Jinja (line {error.lineno}: {error.message}); "
                                 "fix it or pass another with --chat-template FILE") from None

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; a template that refuses the messages (raise_exception, a failing expression) is a
        RequestError: the request, not the server, is at fault."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}  # the request's kwargs win over the special tokens
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except RequestError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as error:
            raise RequestError(f"the chat template failed on these messages ({type(error).__name__}: {error}); "
                               "check the roles and their order") from None


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body as is (transformers uses it to find the
    assistant's tokens for training masks, which serving does not need)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise RequestError(f"the chat template refused the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come with downloaded checkpoints: untrusted code, hence the sandbox (as transformers).
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env
