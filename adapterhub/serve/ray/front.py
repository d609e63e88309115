"""The ingress side: what `api.create_app` needs of an engine, backed by the Ray Serve replicas.

There is one implementation of the HTTP API (`serve/api.py`): the ingress runs it on a `ReplicaFront`
instead of an `Engine`. Parsing, tokenizing and validation (every 400) happen here, in the ingress, exactly
as in `adapterhub serve`; the model is resolved here to a manifest digest through the registry (404), so a
moved tag is seen by the next request while requests in flight finish on their digest; the replica's engine
then raises what only it can know (422 from checking the adapter against the base, 429) before it accepts.

A replica that dies is replaced by Ray Serve. Its requests that had not sent a token yet are sent again (up
to ``max_attempts`` tries; greedy and seeded sampling give the same text); a stream that had begun ends with
`ReplicaUnavailableError` (HTTP 503, retryable), never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from adapterhub.adapter import adapter_source
from adapterhub.errors import ConfigError, QueueFullError, ReplicaUnavailableError, RequestError
from adapterhub.registry import Registry
from adapterhub.runtime.model import checkpoint, loader, tiny
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.runtime.model.tokenizer import Tokenizer
from adapterhub.serve.engine import DEFAULT_MAX_SEQ
from adapterhub.serve.loader import AdapterSource
from adapterhub.serve.ray.config import RayServeConfig
from adapterhub.serve.ray.metrics import ClusterMetrics
from adapterhub.serve.ray.replica import Accepted
from adapterhub.serve.requests import Delta, RequestHandle, SamplingParams, validate_request

log = logging.getLogger("adapterhub.serve.ray")

_LOST = (RayActorError, ActorUnavailableError)  # the replica's process died or cannot be reached
_RETRY_BACKOFF_S = 0.5


@dataclass(frozen=True)
class BaseFiles:
    """What the HTTP app reads of a base: its tokenizer (the ingress holds no weights)."""

    tokenizer: Tokenizer
    max_position_embeddings: int
    vocab_size: int
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # generation_config.json: the request defaults


def read_base_files(name: str) -> BaseFiles:
    """The tokenizer and the context of a base, without loading its weights."""
    if name == "tiny":
        config, tokenizer = tiny.TINY_CONFIG, tiny.byte_tokenizer()
    else:
        path = checkpoint.resolve_dir(name)
        config = checkpoint.read_config(path)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is None:
        raise ConfigError(f"base {name!r} has no tokenizer.json; the server takes text, so it needs one: save it "
                          "beside the weights (transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
    defaults = SamplingDefaults() if name == "tiny" else loader.load_sampling_defaults(name)
    return BaseFiles(tokenizer, config.max_position_embeddings, config.vocab_size, defaults)


class ReplicaFront:
    """``ReplicaFront(config, replicas, board)``: replicas and board are Ray Serve deployment handles."""

    def __init__(self, config: RayServeConfig, replicas, board) -> None:
        files = read_base_files(config.base)
        self.config = config
        self.base = files  # the app reads `base.tokenizer`
        self.base_name = config.base
        self.max_seq = min(config.max_seq or DEFAULT_MAX_SEQ, files.max_position_embeddings)
        self.vocab_size = files.vocab_size
        # Resolution only: the replicas read and check the adapters.
        self.source = AdapterSource(Registry(config.registry), _never_called, self.base_name, config.allow_hub)
        self.metrics = ClusterMetrics(board)
        self._replicas = replicas
        self._ids = itertools.count(1)

    # --- what api.create_app calls ----------------------------------------------------------------------------

    def submit(self, prompt: list[int], model: str | None = None, params: SamplingParams = SamplingParams(),
               loop: asyncio.AbstractEventLoop | None = None, is_streaming: bool = True) -> RequestHandle:
        """As `Engine.submit` (from a worker thread, with the app's `loop`): returns once a replica accepted the
        request, or raises its 4xx."""
        validate_request(prompt, params, self.max_seq, self.vocab_size)
        resolved = self.source.resolve(model)
        handle = RequestHandle(f"cmpl-{next(self._ids)}", resolved.model, len(prompt), loop, is_streaming)
        accepted: Future = Future()
        asyncio.run_coroutine_threadsafe(self._pump(handle, resolved, prompt, params, accepted), loop)
        accepted.result()
        return handle

    def submit_many(self, prompt: list[int], model: str | None, params: list[SamplingParams],
                    loop: asyncio.AbstractEventLoop | None = None, is_streaming: bool = True) -> list[RequestHandle]:
        """OpenAI's `n`: one request per choice, each routed by the adapter's digest (so all to one replica
        while it has room). Accepted one by one; if one is refused, those accepted are cancelled (as a client
        that went away), so it is all or none as with `Engine.submit_many`."""
        handles: list[RequestHandle] = []
        try:
            for p in params:
                handles.append(self.submit(prompt, model, p, loop, is_streaming))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def add_named_adapter(self, name: str, source: str) -> Future:
        """vLLM's load_lora_adapter: `name` becomes another model name for a registry version (the replicas load
        it by digest on first use); a PEFT directory is refused, since replicas on other hosts could not read it."""
        if isinstance(adapter_source(source), Path):
            raise RequestError(f"lora_path {source!r} is a directory; replicas on Ray Serve load adapters from the "
                               "registry: push it (adapterhub push DIR TASK) and pass its ref")
        return _done(self.source.add_alias(name, source).digest)

    def remove_named_adapter(self, name: str) -> Future:
        """vLLM's unload_lora_adapter: forgets the name (replicas drop the version by their LRU)."""
        digest = self.source.alias(name).digest
        self.source.remove_alias(name)
        return _done(digest)

    def load_adapter(self, model: str) -> Future:
        """POST /v1/adapters: loads it on the replica Ray Serve routes its digest to."""
        resolved = self._adapter(model)
        digest = _call(self._caller(resolved.digest, stream=False).load.remote(resolved.pinned_ref))
        return _done(digest)

    def unload_adapter(self, model: str) -> Future:
        """DELETE /v1/adapters/{ref}: unloads it from the replica Ray Serve routes its digest to (one holding it,
        if any). Other replicas holding it keep it until their LRU drops it."""
        resolved = self._adapter(model)
        return _done(_call(self._caller(resolved.digest, stream=False).unload.remote(resolved.pinned_ref)))

    def resident(self) -> dict[str, str]:
        """digest -> label of the adapters any replica holds (as last reported)."""
        return self.metrics.resident()

    def close(self) -> None:
        self.metrics.close()

    # --- internals ------------------------------------------------------------------------------------------

    def _adapter(self, model: str):
        resolved = self.source.resolve(model)
        if resolved.digest is None:
            raise RequestError(f"'{model}' is the base model, not an adapter; pass an adapter ref")
        return resolved

    def _caller(self, digest: str | None, stream: bool):
        if digest is not None and self.config.routing == "multiplexed":
            return self._replicas.options(multiplexed_model_id=digest, stream=stream)
        return self._replicas.options(stream=stream)

    async def _pump(self, handle: RequestHandle, resolved, prompt, params, accepted: Future) -> None:
        try:
            await self._attempts(handle, resolved, prompt, params, accepted)
        finally:  # never leave the submitting thread waiting
            _settle(accepted, ReplicaUnavailableError("the request ended before a replica accepted it; send it again"))

    async def _attempts(self, handle: RequestHandle, resolved, prompt, params, accepted: Future) -> None:
        """Feeds the replica's stream into `handle`; tries again on another replica while no text went out."""
        caller = self._caller(resolved.digest, stream=True)
        for attempt in range(1, self.config.max_attempts + 1):
            has_text = False
            stream = caller.generate.remote(prompt, resolved.digest, resolved.pinned_ref, params, handle.is_streaming)
            try:
                async for event in stream:
                    if isinstance(event, Accepted):
                        _settle(accepted, None)
                    elif handle.is_cancelled:  # the client left: stop the replica's row too
                        stream.cancel()
                        return
                    else:
                        handle.emit(event)
                        has_text = has_text or isinstance(event, Delta)
                return
            except Exception as raised:
                error = _unwrap(raised)
                if not isinstance(error, _LOST):
                    if not _settle(accepted, error):
                        handle.fail(error)
                    return
                if has_text or attempt == self.config.max_attempts:
                    lost = ReplicaUnavailableError(
                        f"the replica serving this request stopped ({type(error).__name__}) after "
                        f"{'sending part of the answer' if has_text else f'{attempt} tries'}; send the request again")
                    if not _settle(accepted, lost):
                        handle.fail(lost)
                    return
                log.warning("replica lost (%s); sending %s again (try %d)", type(error).__name__, handle.id,
                            attempt + 1)
                self.metrics.count_retry()
                await asyncio.sleep(_RETRY_BACKOFF_S * attempt)


def _never_called(adapter, model) -> None:
    raise AssertionError("the ingress resolves adapters; replicas read and check them")


def _unwrap(error: Exception) -> Exception:
    """A replica's own error (RefNotFoundError, IncompatibleAdapterError, …) instead of Ray's wrapper."""
    if isinstance(error, BackPressureError):
        return QueueFullError(f"every replica is busy and the ingress queue is full; retry later or start more "
                              f"replicas ({error})")
    if isinstance(error, RayTaskError) and not isinstance(error, _LOST) and error.cause is not None:
        return error.cause
    return error


def _call(response):
    """The result of a unary replica call (from a worker thread), with the replica's own error raised."""
    try:
        return response.result()
    except Exception as error:
        raise _unwrap(error) from None


def _settle(future: Future, error: Exception | None) -> bool:
    """Resolves `future` once (None: accepted); False when it was already resolved."""
    if future.done():
        return False
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return True


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
