"""OpenAI-compatible request bodies → engine requests, and engine results → response JSON.

Types are checked here (HTTP 400 with the field and the value); value ranges that depend on the
model (context length, vocabulary) are checked by the engine (`requests.validate_request`).
Follows the OpenAI completions / chat completions wire format: `choices[].text` or
`choices[].message`, `finish_reason`, `usage`, and SSE chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from adapterhub.errors import RequestError
from adapterhub.serve.requests import Finished, SamplingParams

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
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON ({error}); send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion(body: dict, tokenizer) -> ParsedRequest:
    prompt = body.get("prompt", _MISSING)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one, as OpenAI clients often send
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    else:
        raise RequestError(
            f"'prompt' must be a string or a non-empty list of token ids (one prompt per request), "
            f"got {_show(prompt)}"
        )
    return ParsedRequest(_model(body), ids, _params(body, default_max_tokens=16), *_stream(body))


def parse_chat(body: dict, tokenizer, max_seq: int) -> ParsedRequest:
    messages = body.get("messages", _MISSING)
    if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
        raise RequestError(
            "'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"} objects "
            "(content: a string or a list of text parts), "
            f"got {_show(messages)}"
        )
    messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
    # Chat templates write their own BOS; adding special tokens again would double it (as transformers avoids).
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    room = max(1, min(256, max_seq - len(ids)))  # OpenAI's default: as much as fits (capped here)
    return ParsedRequest(_model(body), ids, _params(body, default_max_tokens=room), *_stream(body))


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
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 422: "incompatible_adapter_error", 429: "rate_limit_error"}
    return {"error": {"message": str(error), "type": kinds.get(status, "server_error"),
                      "code": type(error).__name__}}


# --- fields -----------------------------------------------------------------------------------


def _params(body: dict, default_max_tokens: int) -> SamplingParams:
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError(f"only n=1 is supported, got n={_show(n)}; send several requests instead")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max_tokens))
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple):
        raise RequestError(f"'stop' must be a string or a list of strings, got {_show(stop)}")
    return SamplingParams(
        max_tokens=_field(body, "max_tokens", max_tokens, _is_int),
        temperature=float(_field(body, "temperature", _or(body, "temperature", 1.0), _is_number)),
        top_p=float(_field(body, "top_p", _or(body, "top_p", 1.0), _is_number)),
        top_k=_field(body, "top_k", _or(body, "top_k", 0), _is_int),
        seed=_field(body, "seed", body.get("seed"), lambda v: v is None or _is_int(v)),
        stop=tuple(stop),
    )


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string (the base name or an adapter ref), got {_show(model)}")
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    is_stream = _field(body, "stream", body.get("stream", False), lambda v: isinstance(v, bool))
    options = _field(body, "stream_options", body.get("stream_options") or {}, lambda v: isinstance(v, dict))
    return is_stream, bool(options.get("include_usage", False))


def _or(body: dict, key: str, default):
    value = body.get(key)
    return default if value is None else value


def _field(body: dict, name: str, value, is_valid):
    if not is_valid(value):
        raise RequestError(f"'{name}' has the wrong type: {_show(value)}")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_message(m) -> bool:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
        return False
    content = m.get("content")
    return isinstance(content, str) or (isinstance(content, list) and all(_is_text_part(p) for p in content))


def _is_text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _text_of(content: str | list) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def _show(value) -> str:
    text = "missing" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _envelope(request_id: str, model: str, kind: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}
