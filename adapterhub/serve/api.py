"""The OpenAI-style HTTP API over an :class:`~adapterhub.serve.engine.Engine` (Starlette; run with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a chat template),
GET /v1/models, POST /v1/adapters {"ref"}, DELETE /v1/adapters/{ref}, GET /health, GET /metrics.
`model` names an adapter ref (``task@v3``, ``task:prod``, ``task`` = ``task:latest``) or the base.
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
from adapterhub.serve.bodylimit import BodyLimit
from adapterhub.serve.engine import Engine
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.openai import (ParsedRequest, chunk_json, completion_json, error_json, parse_chat,
                                     parse_completion, parse_json, prompt_char_limit, usage_chunk_json)
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

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guard(self.chat_completions), methods=["POST"]),
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/v1/adapters", self._guard(self.load_adapter), methods=["POST"]),
            Route("/v1/adapters/{ref}", self._guard(self.unload_adapter), methods=["DELETE"]),
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
        parsed, handle = await self._submit(request, is_chat)
        request_id = ("chatcmpl-" if is_chat else "cmpl-") + handle.id.split("-", 1)[1]
        if parsed.is_stream:
            return StreamingResponse(_sse(handle, request_id, is_chat, parsed.has_stream_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text, done = await handle.aresult()
        finally:
            handle.cancel()  # no-op when finished; frees the row if this task was cancelled
        return JSONResponse(completion_json(request_id, handle.model, text, done, is_chat))

    async def _submit(self, request: Request, is_chat: bool) -> tuple[ParsedRequest, RequestHandle]:
        """Parses and queues a request; rejections (400/404/408/413/422/429) are counted by error class."""
        try:
            raw = await _read_body(request)
            # Parsing, tokenizing and registry reads are CPU or disk work: on a worker thread, so that
            # /health and the streams in flight keep flowing while a big prompt is handled.
            return await run_in_threadpool(self._parse_and_submit, raw, is_chat, asyncio.get_running_loop())
        except AdapterHubError as error:
            self.engine.metrics.count_request(type(error).__name__)
            raise

    def _parse_and_submit(self, raw: bytes, is_chat: bool, loop) -> tuple[ParsedRequest, RequestHandle]:
        parsed = self._parse(parse_json(raw), is_chat)
        handle = self.engine.submit(parsed.prompt, parsed.model, parsed.params, loop, parsed.is_stream)
        return parsed, handle

    def _parse(self, body: dict, is_chat: bool) -> ParsedRequest:
        if not is_chat:
            return parse_completion(body, self.tokenizer, self.max_prompt_chars)
        if not _has_chat_template(self.tokenizer):
            raise RequestError("this base's tokenizer has no chat template; use /v1/completions")
        return parse_chat(body, self.tokenizer, self.engine.max_seq, self.max_prompt_chars)

    async def models(self, request: Request) -> Response:
        engine = self.engine
        tasks = await run_in_threadpool(_registry_tasks, engine.source.registry)
        data = [_model_json(engine.base_name, "base")]
        data += [_model_json(name, "adapter", digest=digest, loaded=True)
                 for digest, name in sorted(engine.resident().items(), key=lambda kv: kv[1])]
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


async def _sse(handle, request_id: str, is_chat: bool, has_usage: bool):
    """OpenAI chunk stream; an error after the headers went out becomes an error event."""
    is_first = True
    try:
        async for event in handle.stream():
            if isinstance(event, Delta):
                chunk = chunk_json(request_id, handle.model, event.text, None, is_chat, is_first)
                is_first = False
            else:
                assert isinstance(event, Finished)
                chunk = chunk_json(request_id, handle.model, None, event.finish_reason, is_chat, is_first)
                if has_usage:
                    yield f"data: {json.dumps(chunk)}\n\n"
                    chunk = usage_chunk_json(request_id, handle.model, event, is_chat)
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as error:  # this request failed (the engine logged why; the others go on): end it properly
        status = error.http_status if isinstance(error, AdapterHubError) else 500
        yield f"data: {json.dumps(error_json(error, status))}\n\n"
    finally:
        handle.cancel()  # the client went away, or the stream ended: never keep decoding for nobody
    yield "data: [DONE]\n\n"


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
