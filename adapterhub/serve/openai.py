"""OpenAI-compatible request bodies → engine requests, and engine results → response JSON.

Types and ranges are checked here (HTTP 400 naming the field, its value and what is allowed), before
anything reaches the engine thread; what depends on the tokenized prompt (context length, vocabulary)
is checked by `requests.validate_request` when the request is submitted. A prompt too long for the
context is refused on its character count before it is tokenized (`prompt_char_limit`).
Follows the OpenAI completions / chat completions wire format: `choices[].text` or
`choices[].message`, `finish_reason`, `logprobs`, `usage`, and SSE chunks ending with `data: [DONE]`.
Every field of a body is in one of the tables below (`_FIELDS`, `_OFF`): implemented, or refused unless
it asks for nothing; any other field is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Sequence

from adapterhub.errors import RequestError
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.serve.requests import (MAX_STOP_CHARS, MAX_STOPS, RANGES, Finished, Range, SamplingParams,
                                       TokenLogprob)

_MISSING = object()


@dataclass(frozen=True)
class ParsedRequest:
    model: str | None
    prompt: list[int]
    params: SamplingParams  # choice 0's; `choices()` gives every choice's
    is_stream: bool
    has_stream_usage: bool  # stream_options.include_usage: a last chunk carries `usage`
    n: int = 1

    def choices(self) -> list[SamplingParams]:
        """One parameter set per choice: with a seed, choice i samples with seed + i, so the n choices differ
        and the same request gives the same n choices again (choice 0 is the n=1 completion)."""
        if self.params.seed is None:
            return [self.params] * self.n
        return [dataclasses.replace(self.params, seed=_wrap_int64(self.params.seed + i)) for i in range(self.n)]


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:  # the C decoder recurses once per nesting level
        raise RequestError("the request body is nested too deeply to be a request; send a flat JSON object") from None
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSONDecodeError, or an int of > 4300 digits
        raise RequestError(f"the request body is not valid JSON ({error}); send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def prompt_char_limit(tokenizer, max_seq: int) -> int:
    """The most characters a prompt that fits `max_seq` tokens can have.

    No vocabulary entry (special tokens included) decodes to more than `longest` UTF-8 bytes, and a
    character is at least one byte, so a longer prompt is over the context whatever its text, and is
    refused without tokenizing it. (+1: SentencePiece drops a piece's leading space when it decodes it
    alone.)
    """
    pieces = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    longest = max(len(piece.encode()) for piece in pieces)
    return max_seq * (longest + 1)


def parse_completion(body: dict, tokenizer, max_prompt_chars: int,
                     defaults: SamplingDefaults = SamplingDefaults()) -> ParsedRequest:
    _check_fields(body, "completions")
    prompt = body.get("prompt", _MISSING)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one, as OpenAI clients often send
    is_text = isinstance(prompt, str)
    if not (is_text or isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        raise RequestError(
            f"'prompt' must be a string or a non-empty list of token ids (one prompt per request), "
            f"got {_show(prompt)}"
        )
    if is_text:
        _check_chars("prompt", len(prompt), max_prompt_chars)
    logprobs = _ranged(body, "logprobs", None)  # completions: an int, the number of top tokens
    params = _params(body, defaults, defaults.max_new_tokens or 16, logprobs)
    model, stream, n = _model(body), _stream(body), _n(body)
    ids = tokenizer.encode(prompt) if is_text else list(prompt)  # the costly part, once the rest is known good
    return ParsedRequest(model, ids, params, *stream, n)


def parse_chat(body: dict, tokenizer, max_seq: int, max_prompt_chars: int,
               defaults: SamplingDefaults = SamplingDefaults()) -> ParsedRequest:
    _check_fields(body, "chat")
    messages = [_message(i, m) for i, m in enumerate(_messages(body))]
    _check_chars("messages", sum(len(m["role"]) + len(m["content"]) for m in messages), max_prompt_chars)
    params = _params(body, defaults, None, _chat_logprobs(body))
    model, stream, n = _model(body), _stream(body), _n(body)
    add_generation_prompt = _field("add_generation_prompt", _or(body, "add_generation_prompt", True),
                                   lambda v: isinstance(v, bool))
    # Chat templates write their own BOS; adding special tokens again would double it (as transformers avoids).
    text = tokenizer.apply_chat_template(messages, add_generation_prompt, **_template_kwargs(body))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if params.max_tokens is None:  # OpenAI's default: as much as fits (capped: generation_config's, else 256)
        room = max(1, min(defaults.max_new_tokens or 256, max_seq - len(ids)))
        params = dataclasses.replace(params, max_tokens=room)
    return ParsedRequest(model, ids, params, *stream, n)


def completion_json(request_id: str, model: str, choices: list[tuple[str, Finished, dict | None]], is_chat: bool,
                    prompt_tokens: int) -> dict:
    """choices: (text, Finished, logprobs JSON or None) per choice, in order."""
    out = []
    for index, (text, done, logprobs) in enumerate(choices):
        choice = {"index": index, "finish_reason": done.finish_reason, "logprobs": logprobs}
        if is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out.append(choice)
    return {
        **_envelope(request_id, model, "chat.completion" if is_chat else "text_completion"),
        "choices": out,
        "usage": _usage(prompt_tokens, sum(done.completion_tokens for _, done, _ in choices),
                        choices[0][1].cached_tokens),
    }


def chunk_json(request_id: str, model: str, text: str | None, finish_reason: str | None, is_chat: bool,
               is_first: bool = False, index: int = 0, logprobs: dict | None = None) -> dict:
    """One SSE chunk of choice `index`: a text delta, or (text None) the final chunk carrying finish_reason."""
    choice = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
    if is_chat:
        delta = {} if text is None else {"content": text}
        if is_first:
            delta["role"] = "assistant"
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {**_envelope(request_id, model, "chat.completion.chunk" if is_chat else "text_completion"),
            "choices": [choice]}


def usage_chunk_json(request_id: str, model: str, prompt_tokens: int, completion_tokens: int, is_chat: bool,
                     cached_tokens: int = 0) -> dict:
    """The extra last chunk of `stream_options: {"include_usage": true}`: no choices, the usage of all choices."""
    return {**_envelope(request_id, model, "chat.completion.chunk" if is_chat else "text_completion"),
            "choices": [], "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}


def chat_logprobs_json(tokenizer, entries: Sequence[TokenLogprob]) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def token(token_id: int, logprob: float) -> dict:
        return {"token": _token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [{**token(e.token, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs_json(tokenizer, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: parallel lists of tokens, their log-probabilities, the top ones (with the
    sampled token, so up to logprobs + 1 of them) and each token's character offset: the summed lengths of the
    tokens before it, from `offset` (what earlier chunks of the stream covered)."""
    tokens = [_token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = [{**{_token_text(tokenizer, i): lp for i, lp in e.top}, tokens[j]: e.logprob}
            for j, e in enumerate(entries)]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def error_json(error: Exception, status: int) -> dict:
    kinds = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
             422: "incompatible_adapter_error", 429: "rate_limit_error"}
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": str(error), "type": kind, "code": type(error).__name__}}


# --- fields -----------------------------------------------------------------------------------

# Every request field this server knows, per route (docs/serving.md lists them). A field outside these tables is
# refused with a 400 naming it, as OpenAI refuses an unrecognized argument: a client never silently gets a
# completion without what it asked for. `user` identifies the client's end user and changes nothing.
_SAMPLING = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options",
             "stop", "seed", "presence_penalty", "frequency_penalty", "user",
             "top_k", "repetition_penalty", "ignore_eos"}  # the last three: vLLM's extensions
_FIELDS = {
    "completions": _SAMPLING | {"prompt", "logprobs"},
    "chat": _SAMPLING | {"messages", "logprobs", "top_logprobs", "chat_template_kwargs", "add_generation_prompt"},
}
# Fields known and not implemented, with the values that ask for nothing (null always does): accepted only at
# those. `best_of` equal to `n` also asks for nothing (checked in `_n`).
_OFF = {
    "echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},),
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
    "prediction": (), "reasoning_effort": (), "web_search_options": (), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "min_p": (0,), "min_tokens": (0,), "continue_final_message": (False,),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
}
_ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_MESSAGE_FIELDS = {"role", "content", "name"}
_TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt"}  # set by the server itself


_MAX_MODEL_CHARS = 256  # refs are at most 'task@sha256:<64 hex>' with a 64-character task
MAX_N = 16  # choices per request: each is a row of the batch
_RANGES = {"n": Range(1, MAX_N, is_integer=True), "top_logprobs": RANGES["logprobs"]}


def _check_fields(body: dict, route: str) -> None:
    known = _FIELDS[route]
    for name, value in body.items():
        if name in known:
            continue
        if name not in _OFF:
            raise RequestError(f"'{_clip(str(name), 0)}' is not a field of {_ROUTES[route]} this server knows; "
                               "remove it (docs/serving.md lists the fields)")
        if value is not None and not any(_same(value, v) for v in _OFF[name]) and name != "best_of":
            raise RequestError(f"'{name}' is not supported by this server, got {_show(value)}; leave it out")


def _same(value, off) -> bool:
    """Equal, with booleans never equal to numbers (False is not 0 here)."""
    return isinstance(value, bool) == isinstance(off, bool) and value == off


def _params(body: dict, defaults: SamplingDefaults, default_max_tokens: int | None,
            logprobs: int | None) -> SamplingParams:
    """The sampling fields; one the request leaves out takes generation_config.json's value, else OpenAI's."""
    def value(name: str, fallback):
        given = _ranged(body, name, None)
        if given is not None:
            return given
        default = getattr(defaults, name, None)
        return fallback if default is None else default

    return SamplingParams(
        max_tokens=_max_tokens(body, default_max_tokens),
        temperature=float(value("temperature", 1.0)),
        top_p=float(value("top_p", 1.0)),
        top_k=value("top_k", 0),
        seed=_ranged(body, "seed", None),
        stop=_stop(body),
        presence_penalty=float(_ranged(body, "presence_penalty", 0.0)),
        frequency_penalty=float(_ranged(body, "frequency_penalty", 0.0)),
        repetition_penalty=float(value("repetition_penalty", 1.0)),
        logprobs=logprobs,
        ignore_eos=_field("ignore_eos", _or(body, "ignore_eos", False), lambda v: isinstance(v, bool)),
    )


def _n(body: dict) -> int:
    n = _ranged(body, "n", 1)
    best_of = body.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of in (1, n)):
        raise RequestError(f"'best_of' is not supported by this server, got {_show(best_of)}; leave it out "
                           f"(or set it to n={n})")
    return n


def _chat_logprobs(body: dict) -> int | None:
    """Chat: `logprobs` true asks for them, `top_logprobs` for how many alternatives (0-20)."""
    wanted = _field("logprobs", _or(body, "logprobs", False), lambda v: isinstance(v, bool))
    top = _ranged(body, "top_logprobs", None)
    if top is not None and not wanted:
        raise RequestError(f"'top_logprobs' is {top} but 'logprobs' is not true; send \"logprobs\": true with it")
    return (top or 0) if wanted else None


def _template_kwargs(body: dict) -> dict:
    kwargs = _field("chat_template_kwargs", _or(body, "chat_template_kwargs", {}), lambda v: isinstance(v, dict))
    taken = sorted(_TEMPLATE_VARIABLES & set(kwargs))
    if taken:
        raise RequestError(f"'chat_template_kwargs' may not set {taken}: the server sets them; use the request's "
                           "own fields")
    return kwargs


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _max_tokens(body: dict, default: int | None) -> int | None:
    """`max_tokens`, or its newer name `max_completion_tokens`; >= 1 here, the context bound at submission."""
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    value = _or(body, name, default)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise RequestError(f"'{name}' must be an integer >= 1 (prompt + {name} within the context), "
                           f"got {_show(value)}")
    return value


def _ranged(body: dict, name: str, default):
    """A numeric field checked against `requests.RANGES` (or `_RANGES`); null means the default."""
    value = _or(body, name, default)
    allowed = RANGES.get(name) or _RANGES[name]
    if value is not None and not allowed.contains(value):
        raise RequestError(f"'{name}' must be {allowed.describe()}, got {_show(value)}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS
            and all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings of at most "
                           f"{MAX_STOP_CHARS} characters, got {_show(body.get('stop'))}")
    return tuple(stop)


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not (isinstance(model, str) and len(model) <= _MAX_MODEL_CHARS):
        raise RequestError(f"'model' must be a string of at most {_MAX_MODEL_CHARS} characters (the base name or "
                           f"an adapter ref), got {_show(model)}")
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    is_stream = _field("stream", _or(body, "stream", False), lambda v: isinstance(v, bool))
    options = _field("stream_options", _or(body, "stream_options", {}), lambda v: isinstance(v, dict))
    has_usage = _field("stream_options.include_usage", _or(options, "include_usage", False),
                       lambda v: isinstance(v, bool))
    return is_stream, has_usage


def _messages(body: dict) -> list:
    messages = body.get("messages", _MISSING)
    if not (isinstance(messages, list) and messages):
        raise RequestError(
            "'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"} objects "
            f"(content: a string or a list of text parts), got {_show(messages)}"
        )
    return messages


def _message(i: int, m) -> dict:
    """One chat message as {"role", "content": str[, "name"]}; content may come as a list of text parts, joined
    with newlines (as vLLM does for templates that expect a string)."""
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
        raise RequestError(f"'messages[{i}]' must be an object with a string 'role', got {_show(m)}")
    extra = next((k for k, v in m.items() if k not in _MESSAGE_FIELDS and v not in (None, [])), None)
    if extra is not None:
        raise RequestError(f"'messages[{i}].{_clip(str(extra), 0)}' is not supported by this server (no tool calls); "
                           "send messages with 'role', 'content' and optionally 'name'")
    content = m.get("content", _MISSING)
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"'messages[{i}].content' must be a string or a list of "
                           f"{{\"type\": \"text\", \"text\": \"...\"}} parts, got {_show(content)}")
    message = {"role": m["role"], "content": content}
    if m.get("name") is not None:
        message["name"] = _field(f"messages[{i}].name", m["name"], lambda v: isinstance(v, str))
    return message


def _check_chars(name: str, chars: int, limit: int) -> None:
    if chars > limit:
        raise RequestError(f"'{name}' has {chars} characters, more than the context can hold as tokens (at most "
                           f"{limit} characters for this base); shorten it")


def _or(body: dict, key: str, default):
    value = body.get(key)
    return default if value is None else value


def _field(name: str, value, is_valid):
    if not is_valid(value):
        raise RequestError(f"'{name}' has the wrong type: {_show(value)}")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _show(value) -> str:
    """A short JSON rendering of a client's value for an error message, whatever its size or depth."""
    if value is _MISSING:
        return "missing"
    text = json.dumps(_clip(value, depth=3))
    return text if len(text) <= 80 else text[:77] + "..."


def _clip(value, depth: int):
    """At most 8 items per level, 3 levels, 80 characters per string: a huge value costs nothing to show."""
    if isinstance(value, str):
        return value[:80]
    if isinstance(value, list | dict) and depth == 0:
        return "..."
    if isinstance(value, list):
        return [_clip(v, depth - 1) for v in value[:8]] + (["..."] if len(value) > 8 else [])
    if isinstance(value, dict):
        return {str(k)[:80]: _clip(v, depth - 1) for k, v in list(value.items())[:8]}
    return value


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens`: the prompt tokens read from the prefix cache (the
    first choice's: the n choices of one request are admitted together and share nothing among themselves)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(request_id: str, model: str, kind: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}
