"""The OpenAI-style HTTP API over an :class:`~adapterhub.serve.engine.Engine` (Starlette; run with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a chat template),
GET /v1/models, POST /v1/adapters {"ref"}, DELETE /v1/adapters/{ref}, vLLM's POST /v1/load_lora_adapter
{"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}, GET /health, GET /metrics.
`model` names an adapter ref (``task@v3``, ``task:prod``, ``task`` = ``task:latest``), a named adapter, or
the base. A request with `n` choices runs them as n rows and answers once (or streams them interleaved).
Every error is JSON ``{"error": {"message", "type", "code"}}`` with the status of its class in
`adapterhub.errors` (400, 404, 408, 413, 422, 429, ...); the server stays up.

The event loop only moves bytes: JSON parsing and tokenizing run on worker threads, request bodies are
bounded in size and time (`bodylimit.BodyLimit`), and a prompt longer than the context could hold is refused
on its character count before it is tokenized.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from adapterhub.errors import AdapterHubError, AuthError, RequestError
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.serve.bodylimit import BodyLimit
from adapterhub.serve.engine import Engine
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.openai import (ParsedRequest, chat_logprobs_json, chunk_json, completion_json,
                                     completion_logprobs_json, error_json, parse_chat, parse_completion, parse_json,
                                     prompt_char_limit, usage_chunk_json)
from adapterhub.serve.requests import Delta, Finished, RequestHandle

log = logging.getLogger("adapterhub.serve")


def create_app(engine: Engine, api_key: str | None = None, limits: HttpLimits = HttpLimits()) -> Starlette:
    """``api_key`` None reads ``ADAPTERHUB_API_KEY``; when set, requests need ``Authorization: Bearer <key>``.
    ``limits``: the request body's size and time bounds (the connection-level ones go to `server.uvicorn_config`)."""
    key = api_key if api_key is not None else os.environ.get("ADAPTERHUB_API_KEY") or None
    return Starlette(routes=_Handlers(engine, key).routes(), exception_handlers={HTTPException: _http_error},
                     middleware=[Middleware(BodyLimit, limits=limits)])


class _Handlers:
    """One app's state (the engine, its tokenizer, the API key) and one method per route."""

    def __init__(self, engine: Engine, key: str | None):
        self.engine = engine
        self.tokenizer = engine.base.tokenizer
        self.key = key
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, engine.max_seq)
        self.defaults = getattr(engine.base, "sampling_defaults", SamplingDefaults())  # generation_config.json

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guard(self.chat_completions), methods=["POST"]),
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/v1/adapters", self._guard(self.load_adapter), methods=["POST"]),
            Route("/v1/adapters/{ref}", self._guard(self.unload_adapter), methods=["DELETE"]),
            Route("/v1/load_lora_adapter", self._guard(self.load_lora_adapter), methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._guard(self.unload_lora_adapter), methods=["POST"]),
            Route("/health", self._guard(self.health, is_open=True), methods=["GET"]),
            Route("/metrics", self._guard(self.metrics), methods=["GET"]),
        ]

    def _guard(self, handler, is_open: bool = False):
        """Checks the API key (unless `is_open`) and turns every error into a JSON response: the server
        stays up whatever a handler raises."""

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            try:
                if self.key and not is_open:
                    _check_key(request, self.key)
                return await handler(request)
            except AdapterHubError as error:
                return _error(error, error.http_status)
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                return Response(status_code=499)
            except Exception as error:  # keep serving; the client gets a JSON 500
                log.exception("unhandled error in %s", request.url.path)
                return _error(error, 500)

        return guarded

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=True)

    async def _generate(self, request: Request, is_chat: bool) -> Response:
        parsed, handles = await self._submit(request, is_chat)
        request_id = ("chatcmpl-" if is_chat else "cmpl-") + handles[0].id.split("-", 1)[1]
        logprobs = _LogprobsJson(self.tokenizer, is_chat, parsed.params.logprobs is not None)
        if parsed.is_stream:
            return StreamingResponse(_sse(handles, request_id, is_chat, parsed.has_stream_usage, logprobs),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            results = await asyncio.gather(*(handle.acomplete() for handle in handles))
        finally:
            for handle in handles:
                handle.cancel()  # no-op when finished; frees the rows if this task was cancelled
        choices = [(text, done, logprobs.of(entries, i)) for i, (text, entries, done) in enumerate(results)]
        return JSONResponse(completion_json(request_id, handles[0].model, choices, is_chat, len(parsed.prompt)))

    async def _submit(self, request: Request, is_chat: bool) -> tuple[ParsedRequest, list[RequestHandle]]:
        """Parses and queues a request; rejections (400/404/408/413/422/429) are counted by error class."""
        try:
            raw = await _read_body(request)
            # Parsing, tokenizing and registry reads are CPU or disk work: on a worker thread, so that
            # /health and the streams in flight keep flowing while a big prompt is handled.
            return await run_in_threadpool(self._parse_and_submit, raw, is_chat, asyncio.get_running_loop())
        except AdapterHubError as error:
            self.engine.metrics.count_request(type(error).__name__)
            raise

    def _parse_and_submit(self, raw: bytes, is_chat: bool, loop) -> tuple[ParsedRequest, list[RequestHandle]]:
        parsed = self._parse(parse_json(raw), is_chat)
        handles = self.engine.submit_many(parsed.prompt, parsed.model, parsed.choices(), loop, parsed.is_stream)
        return parsed, handles

    def _parse(self, body: dict, is_chat: bool) -> ParsedRequest:
        if not is_chat:
            return parse_completion(body, self.tokenizer, self.max_prompt_chars, self.defaults)
        if not _has_chat_template(self.tokenizer):
            raise RequestError("this base's tokenizer has no chat template (no chat_template.jinja, nor one in "
                               "tokenizer_config.json); use /v1/completions, or start the server with "
                               "--chat-template FILE")
        return parse_chat(body, self.tokenizer, self.engine.max_seq, self.max_prompt_chars, self.defaults)

    async def models(self, request: Request) -> Response:
        engine = self.engine
        tasks = await run_in_threadpool(_registry_tasks, engine.source.registry)
        named = engine.source.aliases()
        data = [_model_json(engine.base_name, "base")]
        data += [_model_json(name, "adapter", digest=digest, loaded=True)
                 for digest, name in sorted(engine.resident().items(), key=lambda kv: kv[1]) if name not in named]
        data += [_model_json(name, "lora", root=r.root, parent=engine.base_name, digest=r.digest)
                 for name, r in sorted(named.items())]
        data += [_model_json(task, "task") for task in tasks]
        return JSONResponse({"object": "list", "data": data})

    async def load_adapter(self, request: Request) -> Response:
        body = await run_in_threadpool(parse_json, await _read_body(request))
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise RequestError('the body must be {"ref": "<task@vN | task:tag | task>"}')
        digest = await asyncio.wrap_future(await run_in_threadpool(self.engine.load_adapter, ref))
        return JSONResponse({"id": ref, "digest": digest, "loaded": True})

    async def unload_adapter(self, request: Request) -> Response:
        ref = request.path_params["ref"]
        digest = await asyncio.wrap_future(await run_in_threadpool(self.engine.unload_adapter, ref))
        return JSONResponse({"id": ref, "digest": digest, "loaded": False})

    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's route: {"lora_name", "lora_path"}; the path is a registry ref, a PEFT directory or hf://…"""
        body = await run_in_threadpool(parse_json, await _read_body(request))
        name, path = _vllm_fields(body, ("lora_name", "lora_path"))
        digest = await asyncio.wrap_future(await run_in_threadpool(self.engine.add_named_adapter, name, path))
        return JSONResponse({"lora_name": name, "lora_path": path, "digest": digest, "loaded": True})

    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's route: {"lora_name"}."""
        body = await run_in_threadpool(parse_json, await _read_body(request))
        (name,) = _vllm_fields(body, ("lora_name",), optional=("lora_int_id",))
        digest = await asyncio.wrap_future(await run_in_threadpool(self.engine.remove_named_adapter, name))
        return JSONResponse({"lora_name": name, "digest": digest, "loaded": False})

    async def health(self, request: Request) -> Response:
        stats = self.engine.metrics.snapshot()
        return JSONResponse({"status": "ok", "base": self.engine.base_name,
                             "batch_size": stats["batch_size"], "queue_depth": stats["queue_depth"]})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics.prometheus(len(self.engine.resident())),
                                 media_type="text/plain; version=0.0.4")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405 in the same JSON error shape as every other error."""
    return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}"), exc.status_code)


class _LogprobsJson:
    """Turns a choice's `TokenLogprob`s into OpenAI's JSON of the route (None when not asked for); for a stream,
    the completions' character offsets continue across the chunks of each choice."""

    def __init__(self, tokenizer, is_chat: bool, is_wanted: bool):
        self.tokenizer, self.is_chat, self.is_wanted = tokenizer, is_chat, is_wanted
        self._offsets: dict[int, int] = {}

    def of(self, entries, index: int = 0) -> dict | None:
        if not self.is_wanted:
            return None
        if self.is_chat:
            return chat_logprobs_json(self.tokenizer, entries)
        out = completion_logprobs_json(self.tokenizer, entries, self._offsets.get(index, 0))
        if out["tokens"]:
            self._offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out


async def _events(handles: list[RequestHandle]):
    """(choice index, event) from every handle as they come; an error in any ends the whole stream."""
    if len(handles) == 1:
        async for event in handles[0].stream():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for event in handle.stream():
                await queue.put((index, event))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(handles)
        while running:
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            running -= isinstance(event, Finished)
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def _sse(handles: list[RequestHandle], request_id: str, is_chat: bool, has_usage: bool,
               logprobs: _LogprobsJson):
    """OpenAI chunk stream, the n choices interleaved; an error after the headers went out becomes an error event."""
    model, started, completion_tokens, cached_tokens = handles[0].model, set(), 0, 0
    try:
        async for index, event in _events(handles):
            is_first = index not in started
            started.add(index)
            if isinstance(event, Delta):
                chunk = chunk_json(request_id, model, event.text, None, is_chat, is_first, index,
                                   logprobs.of(event.logprobs, index))
            else:
                assert isinstance(event, Finished)
                completion_tokens += event.completion_tokens
                cached_tokens = event.cached_tokens if index == 0 else cached_tokens
                chunk = chunk_json(request_id, model, None, event.finish_reason, is_chat, is_first, index)
            yield f"data: {json.dumps(chunk)}\n\n"
        if has_usage:
            usage = usage_chunk_json(request_id, model, handles[0].prompt_tokens, completion_tokens, is_chat,
                                     cached_tokens)
            yield f"data: {json.dumps(usage)}\n\n"
    except Exception as error:  # this request failed (the engine logged why; the others go on): end it properly
        status = error.http_status if isinstance(error, AdapterHubError) else 500
        yield f"data: {json.dumps(error_json(error, status))}\n\n"
    finally:
        for handle in handles:
            handle.cancel()  # the client went away, or the stream ended: never keep decoding for nobody
    yield "data: [DONE]\n\n"


def _vllm_fields(body: dict, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    """The string fields of a vLLM adapter route, every one required; any other field is refused."""
    unknown = sorted(set(body) - set(names) - set(optional))
    if unknown:
        raise RequestError(f"'{unknown[0]}' is not a field of this route; send {{{', '.join(map(repr, names))}}}")
    for name in names:
        if not isinstance(body.get(name), str) or not body[name]:
            raise RequestError(f"'{name}' must be a non-empty string, got {body.get(name)!r}"[:300])
    return [body[name] for name in names]


# `curl -d` sends application/x-www-form-urlencoded (the README's example); no header is accepted too.
_JSON_MEDIA_TYPES = ("", "application/json", "application/x-www-form-urlencoded")


async def _read_body(request: Request) -> bytes:
    """The body, bounded in size and time by `BodyLimit`, after checking that it claims to be JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _JSON_MEDIA_TYPES and not media_type.endswith("+json"):
        raise RequestError(f"the Content-Type is '{media_type}', not JSON; send the body as a JSON object with "
                           "'Content-Type: application/json'")
    return await request.body()


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise AuthError("missing or wrong API key; send the header 'Authorization: Bearer <ADAPTERHUB_API_KEY>'")


def _error(error: Exception, status: int) -> JSONResponse:
    # A 408 gives up on a client too slow to keep its connection.
    headers = {"connection": "close"} if status == 408 else None
    return JSONResponse(error_json(error, status), status_code=status, headers=headers)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False))


def _model_json(model_id: str, kind: str, **extra) -> dict:
    """An OpenAI model object (id, object, created, owned_by) plus what kind of model it is."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "adapterhub", "kind": kind, **extra}


def _registry_tasks(registry) -> list[str]:
    return [] if registry is None else sorted(str(t) for t in registry.tasks())
