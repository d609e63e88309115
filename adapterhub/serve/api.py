"""The OpenAI-style HTTP API over an :class:`~adapterhub.serve.engine.Engine` (Starlette; run with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a chat template),
GET /v1/models, POST /v1/adapters {"ref"}, DELETE /v1/adapters/{ref}, GET /health, GET /metrics.
`model` names an adapter ref (``task@v3``, ``task:prod``, ``task`` = ``task:latest``) or the base.
Every error is JSON ``{"error": {"message", "type", "code"}}`` with the status of its class in
`adapterhub.errors` (400, 404, 422, 429, ...); the server stays up.
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
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from adapterhub.errors import AdapterHubError, RequestError
from adapterhub.serve.engine import Engine
from adapterhub.serve.openai import (chunk_json, completion_json, error_json, parse_chat, parse_completion,
                                     parse_json, usage_chunk_json)
from adapterhub.serve.requests import Delta, Finished

log = logging.getLogger("adapterhub.serve")


class AuthError(RequestError):
    http_status = 401


def create_app(engine: Engine, api_key: str | None = None) -> Starlette:
    """``api_key`` None reads ``ADAPTERHUB_API_KEY``; when set, requests need ``Authorization: Bearer <key>``."""
    key = api_key if api_key is not None else os.environ.get("ADAPTERHUB_API_KEY") or None
    tokenizer = engine.base.tokenizer

    def endpoint(handler, is_open: bool = False):
        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            try:
                if key and not is_open:
                    _check_key(request, key)
                return await handler(request)
            except AdapterHubError as error:
                return _error(error, error.http_status)
            except Exception as error:  # keep serving; the client gets a JSON 500
                log.exception("unhandled error in %s", request.url.path)
                return _error(error, 500)
        return wrapped

    async def submit(request: Request, is_chat: bool):
        """Parses and queues a request; rejections (400/404/422/429) are counted by error class."""
        try:
            body = parse_json(await request.body())
            if is_chat:
                if not _has_chat_template(tokenizer):
                    raise RequestError("this base's tokenizer has no chat template; use /v1/completions")
                parsed = parse_chat(body, tokenizer, engine.max_seq)
            else:
                parsed = parse_completion(body, tokenizer)
            loop = asyncio.get_running_loop()
            handle = await run_in_threadpool(engine.submit, parsed.prompt, parsed.model, parsed.params, loop,
                                             parsed.is_stream)
        except AdapterHubError as error:
            engine.metrics.count_request(type(error).__name__)
            raise
        return parsed, handle

    async def generate(request: Request, is_chat: bool) -> Response:
        parsed, handle = await submit(request, is_chat)
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

    async def completions(request: Request) -> Response:
        return await generate(request, is_chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, is_chat=True)

    async def models(request: Request) -> Response:
        tasks = await run_in_threadpool(_registry_tasks, engine.source.registry)
        data = [_model_json(engine.base_name, "base")]
        data += [_model_json(name, "adapter", digest=digest, loaded=True)
                 for digest, name in sorted(engine.resident().items(), key=lambda kv: kv[1])]
        data += [_model_json(task, "task") for task in tasks]
        return JSONResponse({"object": "list", "data": data})

    async def load_adapter(request: Request) -> Response:
        body = parse_json(await request.body())
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise RequestError('the body must be {"ref": "<task@vN | task:tag | task>"}')
        digest = await asyncio.wrap_future(await run_in_threadpool(engine.load_adapter, ref))
        return JSONResponse({"id": ref, "digest": digest, "loaded": True})

    async def unload_adapter(request: Request) -> Response:
        ref = request.path_params["ref"]
        digest = await asyncio.wrap_future(await run_in_threadpool(engine.unload_adapter, ref))
        return JSONResponse({"id": ref, "digest": digest, "loaded": False})

    async def health(request: Request) -> Response:
        stats = engine.metrics.snapshot()
        return JSONResponse({"status": "ok", "base": engine.base_name,
                             "batch_size": stats["batch_size"], "queue_depth": stats["queue_depth"]})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(engine.metrics.prometheus(len(engine.resident())),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}"), exc.status_code)

    routes = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/adapters", endpoint(load_adapter), methods=["POST"]),
        Route("/v1/adapters/{ref}", endpoint(unload_adapter), methods=["DELETE"]),
        Route("/health", endpoint(health, is_open=True), methods=["GET"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


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
    except AdapterHubError as error:
        yield f"data: {json.dumps(error_json(error, error.http_status))}\n\n"
    finally:
        handle.cancel()  # the client went away, or the stream ended: never keep decoding for nobody
    yield "data: [DONE]\n\n"


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise AuthError("missing or wrong API key; send the header 'Authorization: Bearer <ADAPTERHUB_API_KEY>'")


def _error(error: Exception, status: int) -> JSONResponse:
    return JSONResponse(error_json(error, status), status_code=status)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False))


def _model_json(model_id: str, kind: str, **extra) -> dict:
    """An OpenAI model object (id, object, created, owned_by) plus what kind of model it is."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "adapterhub", "kind": kind, **extra}


def _registry_tasks(registry) -> list[str]:
    return [] if registry is None else sorted(str(t) for t in registry.tasks())
