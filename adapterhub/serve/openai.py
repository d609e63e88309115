"""OpenAI-compatible request bodies → engine requests, and engine results → response JSON.

Types and ranges are checked here (HTTP 400 naming the field, its value and what is allowed), before
anything reaches the engine thread; what depends on the tokenized prompt (context length, vocabulary)
is checked by `requests.validate_request` when the request is submitted. A prompt too long for the
context is refused on its character count before it is tokenized (`prompt_char_limit`).
Follows the OpenAI completions / chat completions wire format: `choices[].text` or
`choices[].message`, `finish_reason`, `usage`, and SSE chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from adapterhub.errors import RequestError
from adapterhub.serve.requests import MAX_STOP_CHARS, MAX_STOPS, RANGES, Finished, SamplingParams

_MISSING = object()


@dataclass(frozen=True)
class ParsedRequest:
    model: str | None
    prompt: list[int]
    params: SamplingParams
    is_stream: bool
    has_stream_usage: bool  # stream_options.include_usage: a last chunk carries `usage`


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


def parse_completion(body: dict, tokenizer, max_prompt_chars: int) -> ParsedRequest:
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
    params, model, stream = _params(body, default_max_tokens=16), _model(body), _stream(body)
    ids = tokenizer.encode(prompt) if is_text else list(prompt)  # the costly part, once the rest is known good
    return ParsedRequest(model, ids, params, *stream)


def parse_chat(body: dict, tokenizer, max_seq: int, max_prompt_chars: int) -> ParsedRequest:
    messages = [_message(i, m) for i, m in enumerate(_messages(body))]
    _check_chars("messages", sum(len(m["role"]) + len(m["content"]) for m in messages), max_prompt_chars)
    params, model, stream = _params(body, default_max_tokens=None), _model(body), _stream(body)
    # Chat templates write their own BOS; adding special tokens again would double it (as transformers avoids).
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    if params.max_tokens is None:
        room = max(1, min(256, max_seq - len(ids)))  # OpenAI's default: as much as fits (capped here)
        params = dataclasses.replace(params, max_tokens=room)
    return ParsedRequest(model, ids, params, *stream)


def completion_json(request_id: str, model: str, text: str, done: Finished, is_chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": done.finish_reason}
    if is_chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {
        **_envelope(request_id, model, "chat.completion" if is_chat else "text_completion"),
        "choices": [choice],
        "usage": _usage(done),
    }


def chunk_json(request_id: str, model: str, text: str | None, finish_reason: str | None, is_chat: bool,
               is_first: bool = False) -> dict:
    """One SSE chunk: a text delta, or (text None) the final chunk carrying finish_reason."""
    choice = {"index": 0, "finish_reason": finish_reason}
    if is_chat:
        delta = {} if text is None else {"content": text}
        if is_first:
            delta["role"] = "assistant"
        choice["delta"] = delta
    else:
        choice.update(text=text or "", logprobs=None)
    return {**_envelope(request_id, model, "chat.completion.chunk" if is_chat else "text_completion"),
            "choices": [choice]}


def usage_chunk_json(request_id: str, model: str, done: Finished, is_chat: bool) -> dict:
    """The extra last chunk of `stream_options: {"include_usage": true}`: no choices, the usage."""
    return {**_envelope(request_id, model, "chat.completion.chunk" if is_chat else "text_completion"),
            "choices": [], "usage": _usage(done)}


def error_json(error: Exception, status: int) -> dict:
    kinds = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
             422: "incompatible_adapter_error", 429: "rate_limit_error"}
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": str(error), "type": kind, "code": type(error).__name__}}


# --- fields -----------------------------------------------------------------------------------

# OpenAI fields this server does not implement, and the values that mean "off": accepted only at those, so a
# client that asks for one learns it at once instead of silently getting a completion without it.
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
}


_MAX_MODEL_CHARS = 256  # refs are at most 'task@sha256:<64 hex>' with a 64-character task


def _params(body: dict, default_max_tokens: int | None) -> SamplingParams:
    _check_unsupported(body)
    n = body.get("n", 1)
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise RequestError(f"'n': only n=1 is supported (one choice per request), got n={_show(n)}; "
                           "send several requests instead")
    return SamplingParams(
        max_tokens=_max_tokens(body, default_max_tokens),
        temperature=float(_ranged(body, "temperature", 1.0)),
        top_p=float(_ranged(body, "top_p", 1.0)),
        top_k=_ranged(body, "top_k", 0),
        seed=_ranged(body, "seed", None),
        stop=_stop(body),
    )


def _check_unsupported(body: dict) -> None:
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in off):
            raise RequestError(f"'{name}' is not supported by this server, got {_show(value)}; leave it out")


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
    """A numeric field checked against `requests.RANGES`; null means the default."""
    value = _or(body, name, default)
    allowed = RANGES[name]
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
    """One chat message as {"role", "content": str}; content may come as a list of text parts (joined)."""
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
        raise RequestError(f"'messages[{i}]' must be an object with a string 'role', got {_show(m)}")
    content = m.get("content", _MISSING)
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"'messages[{i}].content' must be a string or a list of "
                           f"{{\"type\": \"text\", \"text\": \"...\"}} parts, got {_show(content)}")
    return {"role": m["role"], "content": content}


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


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _envelope(request_id: str, model: str, kind: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}
