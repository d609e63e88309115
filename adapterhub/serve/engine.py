"""The serving engine: continuous batching over many adapters on one base.

One background thread owns the base, its KV cache and its adapter pool: it is the only thread that
touches torch. Requests wait in a bounded queue; between decode steps the thread installs adapters
that were read off-thread (`loader.AdapterSource`), admits waiting requests into free cache rows
(one batched prefill), then runs ONE `base.decode` for every active row, whatever its adapter, and
samples all rows at once. The only host sync per step is one `.tolist()` of the sampled tokens,
needed for stopping and streaming. A finished request frees its cache row and its slot pin.

Each request holds a pin (`pool.acquire`) on the slot of the exact adapter version it resolved at
submission, so a moved tag never changes a request in flight, and LRU eviction never removes an
adapter a running row uses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from adapterhub.errors import CapacityError, QueueFullError, RequestError
from adapterhub.runtime.model.kv_cache import BLOCK_SIZE
from adapterhub.serve.heap import HeapTrimmer
from adapterhub.serve.loader import AdapterSource, ResolvedModel
from adapterhub.serve.metrics import Metrics
from adapterhub.serve.requests import Finished, RequestHandle, SamplingParams, validate_request
from adapterhub.serve.rows import Row, RowBatch

log = logging.getLogger("adapterhub.serve")


# Tokens per request at most, by default (a 128k context is the model's, not what one server row needs).
DEFAULT_MAX_SEQ = 4096
# Default KV budget: at most this fraction of the memory available at start, and never more than the base's
# own weights (the 135M Llama of bench/serve.py then idles under 600 MB resident) nor more than every row at
# max_seq could use; at least one row of max_seq tokens.
KV_MEMORY_FRACTION = 0.125


def default_kv_memory(base, max_batch: int, max_seq: int, available: int | None = None) -> int:
    """The KV cache budget in bytes when none is given (see KV_MEMORY_FRACTION)."""
    per_token = base.kv_bytes_per_token()
    one_row = -(-max_seq // BLOCK_SIZE) * BLOCK_SIZE * per_token
    available = available_memory() if available is None else available
    return max(one_row, min(int(available * KV_MEMORY_FRACTION), base.weight_bytes(), max_batch * one_row))


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # cache rows: requests decoded together
    max_queue: int = 64  # requests waiting for a row before QueueFullError (HTTP 429)
    max_seq: int | None = None  # KV cache length S per row; None: the context length, at most DEFAULT_MAX_SEQ
    base_name: str | None = None  # the `model` value meaning "no adapter"; None: `base.name`
    allow_base_mismatch: bool = False  # load adapters recorded against another base (warns instead of HTTP 422)
    allow_hub: bool = False  # a `model` may be hf://org/name[@revision], imported into the registry on first use
    kv_cache_memory: int | None = None  # KV cache budget in bytes; None: default_kv_memory
    enable_prefix_caching: bool = True  # prompts sharing full 16-token blocks (same adapter) share their KV blocks


@dataclass
class _Waiting:
    handle: RequestHandle
    resolved: ResolvedModel
    adapter: object | None  # Adapter read off-thread; dropped once installed
    prompt: list[int] = field(repr=False)
    params: SamplingParams = SamplingParams()


class Engine:
    """``Engine(base, registry, config)``; ``submit(...)`` returns a :class:`RequestHandle`."""

    def __init__(self, base, registry=None, config: EngineConfig = EngineConfig()):
        self.base = base
        self.config = config
        context = base.config.max_position_embeddings
        self.max_seq = min(config.max_seq or DEFAULT_MAX_SEQ, context)
        self.vocab_size = base.config.vocab_size
        self.base_name = config.base_name or base.name
        self.source = AdapterSource(
            registry, lambda adapter, name: base.pool.check(adapter, name, config.allow_base_mismatch), self.base_name,
            allow_hub=config.allow_hub)
        self.metrics = Metrics()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: deque[_Waiting] = deque()
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._resident: dict[str, str] = {}  # digest -> label ("task@v3")
        self._is_stopping = False
        kv_memory = config.kv_cache_memory or default_kv_memory(base, config.max_batch, self.max_seq)
        self._rows = RowBatch(base, config.max_batch, self.max_seq, self.metrics, self._finish_row, kv_memory,
                              config.enable_prefix_caching)
        cache = self._rows.cache
        self.metrics.set_memory(kv_cache_bytes=cache.nbytes, kv_blocks=cache.num_blocks, kv_block_tokens=cache.block_size,
                                kv_bytes_per_token=base.kv_bytes_per_token(), adapter_dtype=str(base.pool.adapter_dtype),
                                adapter_bytes_per_rank=base.pool.bytes_per_rank())
        self._pool_bytes = base.pool.nbytes()  # re-summed only when the pool changes (_install, _remove)
        self.metrics.set_gauges(queue_depth=0, batch_size=0, adapter_pool_bytes=self._pool_bytes)
        self._heap = HeapTrimmer()
        self._thread = threading.Thread(target=self._run, name="adapterhub-engine", daemon=True)
        self._thread.start()

    # --- client side (any thread) ---------------------------------------------------------------

    def submit(self, prompt: list[int], model: str | None = None, params: SamplingParams = SamplingParams(),
               loop: asyncio.AbstractEventLoop | None = None, is_streaming: bool = True) -> RequestHandle:
        """Validates, resolves the adapter and reads it if not resident, then queues the request.

        Events go to `loop` (asyncio) or to a blocking queue; without `is_streaming` the text arrives
        in one piece when the request finishes (one cross-thread wake-up instead of one per token).

        Blocking (registry I/O): call it from a worker thread in async code. Raises RequestError (400),
        RefNotFoundError (404), IncompatibleAdapterError (422) or QueueFullError (429) before admission.
        """
        return self.submit_many(prompt, model, [params], loop, is_streaming)[0]

    def submit_many(self, prompt: list[int], model: str | None, params: list[SamplingParams],
                    loop: asyncio.AbstractEventLoop | None = None, is_streaming: bool = True) -> list[RequestHandle]:
        """Several completions of one prompt (OpenAI's `n`), each its own row: one adapter version for all, and
        all queued or none. Otherwise as `submit`."""
        for p in params:
            validate_request(prompt, p, self.max_seq, self.vocab_size)
        if len(params) > self.config.max_queue:
            raise RequestError(f"n={len(params)} choices can never fit the queue of {self.config.max_queue} requests; "
                               "ask for fewer, or start the server with a larger --max-queue")
        self._check_queue(len(params))
        resolved = self.source.resolve(model)
        adapter = None
        if resolved.digest is not None and resolved.digest not in self._resident_snapshot():
            adapter = self.source.load(resolved)
        handles = [RequestHandle(f"cmpl-{next(self._ids)}", resolved.model, len(prompt), loop, is_streaming)
                   for _ in params]
        with self._cv:
            self._check_queue(len(params))
            self._waiting.extend(_Waiting(h, resolved, adapter, list(prompt), p) for h, p in zip(handles, params))
            self._cv.notify()
        return handles

    def load_adapter(self, model: str) -> Future:
        """Reads (this thread) and installs (engine thread) an adapter; the future gives its digest."""
        resolved = self.source.resolve(model)
        if resolved.digest is None:
            raise RequestError(f"'{model}' is the base model, not an adapter; pass an adapter ref")
        adapter = self.source.load(resolved)
        return self._call(lambda: self._install(resolved, adapter) or resolved.digest)

    def unload_adapter(self, model: str) -> Future:
        """Removes an adapter version from the pool (an error while a running request uses it)."""
        digest = self.source.resolve(model).digest
        return self._call(lambda: self._remove(digest, model))

    def add_named_adapter(self, name: str, source: str) -> Future:
        """Serves the adapter `source` (a registry ref, a PEFT directory path or hf://…) under the model name `name`
        (vLLM's load_lora_adapter): read now (this thread), installed on the engine thread; the future gives
        its digest."""
        resolved = self.source.add_alias(name, source)
        try:
            adapter = self.source.load(resolved)
        except BaseException:
            self.source.remove_alias(name)
            raise
        return self._call(lambda: self._install(resolved, adapter) or resolved.digest)

    def remove_named_adapter(self, name: str) -> Future:
        """Stops serving `name` (vLLM's unload_lora_adapter); an error while a running request uses it."""
        digest = self.source.alias(name).digest  # RefNotFoundError (404) for a name never added

        def remove() -> str:
            if digest in self.base.pool.names():
                self._remove(digest, name)
            self.source.remove_alias(name)
            return digest

        return self._call(remove)

    def resident(self) -> dict[str, str]:
        """digest -> label ("task@v3"), for the adapters now in the pool."""
        return self._resident_snapshot()

    def memory_summary(self) -> str:
        """One line for the server's start: the KV budget and the adapter pool's bytes."""
        m, cache = self.metrics.snapshot(), self._rows.cache
        return (f"KV cache {m['kv_cache_bytes'] / 2**20:.1f} MiB: {cache.num_blocks} blocks of {cache.block_size} tokens "
                f"({cache.num_blocks * cache.block_size} tokens, {m['kv_bytes_per_token']} bytes each); adapter pool "
                f"{m['adapter_pool_bytes']} bytes now, in {m['adapter_dtype'].removeprefix('torch.')}, "
                f"+{16 * m['adapter_bytes_per_rank'] / 2**20:.1f} MiB per r=16 adapter on every linear; prefix "
                f"caching {'on' if self.config.enable_prefix_caching else 'off'}")

    def close(self) -> None:
        with self._cv:
            self._is_stopping = True
            self._cv.notify()
        self._thread.join()

    # --- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._is_stopping or self._commands or self._waiting or len(self._rows)
                           or self._rows.preempted):
                    self._cv.wait()
                if self._is_stopping:
                    break
                commands, self._commands = list(self._commands), deque()
            for command, future in commands:
                _settle(future, command)
            try:
                self._admit()
                if len(self._rows):
                    self._rows.step()
            except Exception as error:  # base.decode: a batch's fault (a bug, OOM) no one row is known to cause
                log.exception("engine step failed; failing the running requests")
                self._rows.fail_all(error)
            self._heap.maybe_trim()  # between steps: the prefills' freed activations back to the OS (heap.py)
            cache = self._rows.cache
            self.metrics.set_gauges(queue_depth=len(self._waiting) + len(self._rows.preempted), batch_size=len(self._rows),
                                    kv_blocks_free=cache.free_blocks, adapter_pool_bytes=self._pool_bytes)
            self.metrics.set_prefix_cache(queries=cache.prefix_queries, hits=cache.prefix_hits)
        self._shutdown()

    def _admit(self) -> None:
        """Moves waiting requests into free rows while the KV cache has blocks for their prompts: preempted rows
        first (new requests wait behind them), then install adapters, pin their slots, one prefill."""
        self._rows.resume()
        if self._rows.preempted:
            return
        admitted, deferred = [], []
        while True:
            with self._cv:
                if not self._waiting:
                    break
                item = self._waiting.popleft()
                prompts = [(r.adapter, r.prompt) for r in admitted] + [(item.resolved.digest or "", item.prompt)]
                if not self._rows.has_room(prompts):
                    self._waiting.appendleft(item)
                    break
            if item.handle.is_cancelled:
                item.handle.emit(Finished("cancelled", item.handle.prompt_tokens, 0))
                self.metrics.count_request("cancelled")
                continue
            if self._needs_reload(item):
                continue
            try:
                ids = self._pin(item)
            except CapacityError:  # every slot pinned by running rows: retry after one finishes
                deferred.append(item)
                continue
            except Exception as error:  # this request only: the batch keeps running
                item.handle.fail(error)
                self.metrics.count_request(type(error).__name__)
                continue
            admitted.append(Row(item.handle, item.prompt, item.params, ids, item.resolved.digest or ""))
        with self._cv:
            self._waiting.extendleft(reversed(deferred))
        if admitted:
            self._rows.prefill(admitted)

    def _needs_reload(self, item: _Waiting) -> bool:
        """Evicted between submit and admission: read it again on a worker, requeue it at the front."""
        digest = item.resolved.digest
        if digest is None or item.adapter is not None or digest in self.base.pool.names():
            return False
        threading.Thread(target=self._reload, args=(item,), daemon=True).start()
        return True

    def _reload(self, item: _Waiting) -> None:
        try:
            item.adapter = self.source.load(item.resolved)
        except Exception as error:  # e.g. the version was deleted from the registry meanwhile
            item.handle.fail(error)
            self.metrics.count_request(type(error).__name__)
            return
        with self._cv:
            self._waiting.appendleft(item)
            self._cv.notify()

    def _pin(self, item: _Waiting):
        digest = item.resolved.digest
        if digest is not None:
            self._install(item.resolved, item.adapter)
        item.adapter = None
        return self.base.pool.acquire([digest])  # (1,) slot id, pinned until the row finishes

    def _install(self, resolved: ResolvedModel, adapter) -> None:
        if resolved.digest in self.base.pool.names():
            return
        before = set(self.base.pool.names())
        self.base.pool.add(adapter, resolved.digest, self.config.allow_base_mismatch)
        after = set(self.base.pool.names())
        self._pool_bytes = self.base.pool.nbytes()
        self.metrics.add_load(evicted=len(before - after))
        with self._cv:
            for gone in before - after:
                self._resident.pop(gone, None)
            self._resident[resolved.digest] = resolved.label

    def _remove(self, digest: str, model: str) -> str:
        if digest not in self.base.pool.names():
            raise RequestError(f"adapter '{model}' ({digest}) is not loaded; GET /v1/models lists them")
        self.base.pool.remove(digest)
        self._pool_bytes = self.base.pool.nbytes()
        with self._cv:
            self._resident.pop(digest, None)
        return digest

    def _finish_row(self, row: Row, status: str) -> None:
        self.base.pool.release(row.slot_ids)
        self.metrics.count_request(status)

    def _shutdown(self) -> None:
        self._rows.fail_all(RequestError("the server is shutting down; retry on another replica"))
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            commands, self._commands = list(self._commands), deque()
        for item in waiting:
            item.handle.fail(RequestError("the server is shutting down; retry on another replica"))
        for _, future in commands:
            future.cancel()

    # --- helpers ---------------------------------------------------------------------------------

    def _call(self, fn: Callable) -> Future:
        future: Future = Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    def _check_queue(self, n: int = 1) -> None:
        if len(self._waiting) + n > self.config.max_queue:
            raise QueueFullError(
                f"{len(self._waiting)} requests are waiting (max_queue={self.config.max_queue}); "
                f"retry later or start the server with a larger --max-queue"
            )

    def _resident_snapshot(self) -> dict[str, str]:
        with self._cv:
            return dict(self._resident)


def _settle(future: Future, command: Callable) -> None:
    try:
        future.set_result(command())
    except Exception as error:
        future.set_exception(error)
