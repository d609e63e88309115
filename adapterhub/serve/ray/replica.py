"""One Ray Serve replica: the single-process `Engine` (continuous batching across this replica's adapters,
unchanged) behind a streaming method, with Ray Serve's model multiplexing keyed by adapter digest.

The ingress resolves a request's ``model`` to a manifest digest and calls `generate` with
``multiplexed_model_id=digest``: Ray Serve routes it to a replica that reported that digest loaded (while
one has room), and `serve.multiplexed` keeps at most ``max_adapters`` digests per replica in LRU order.
Ray's LRU is the policy and the engine's pool follows it: loading goes through the engine (`Engine.load_adapter`,
so every blob is verified and the adapter checked against the base), and when Ray drops a digest the adapter
leaves the pool, at once or, while running rows pin it, when they finish. The pool has room for ``max_batch``
such leaving adapters beyond ``max_adapters``, so it never evicts one that Ray still routes here.

Every ``REPORT_INTERVAL_S`` the replica sends its counters to the `MetricsBoard` deployment, which the
ingress renders per replica on /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass

import torch
from ray import serve

from adapterhub.errors import AdapterHubError, CapacityError
from adapterhub.registry import Registry
from adapterhub.runtime import load_base
from adapterhub.serve.engine import Engine
from adapterhub.serve.ray.config import RayServeConfig
from adapterhub.serve.requests import SamplingParams

log = logging.getLogger("adapterhub.serve.ray")

REPORT_INTERVAL_S = 0.5
_UNPIN_POLL_S = 0.05


@dataclass(frozen=True)
class Accepted:
    """The first item of every `generate` stream: the engine queued the request (no 4xx), on this replica."""

    replica: str


class EngineReplica:
    """A Ray Serve deployment class (see `app.build_app`): one base, one engine, one adapter pool."""

    def __init__(self, config: RayServeConfig, board) -> None:
        torch.set_num_threads(config.torch_threads)
        # Ray's LRU (max_adapters) decides what stays; the pool has room for max_batch more, the adapters Ray
        # dropped while running rows still pinned them: they leave as those rows finish, and no other adapter
        # is evicted behind Ray's back meanwhile (its view and the pool stay the same set).
        headroom = config.max_batch if config.routing == "multiplexed" else 0
        base = load_base(config.base, compute_dtype=getattr(torch, config.dtype),
                         max_adapters=config.max_adapters + headroom)
        self.engine = Engine(base, Registry(config.registry), config.engine_config())
        self.replica = _replica_name()
        self._board = board
        self._counts: Counter[str] = Counter()  # adapter hits / misses as requests arrive
        self._lock = threading.Lock()
        self._refs: dict[str, str] = {}  # digest -> "task@sha256:…", for the multiplexed loader (~100 B a digest)
        self._leaving: set[str] = set()  # digests Ray dropped that running rows still pin
        self._get_adapter = _multiplexed(self._load_adapter, config.max_adapters)
        self._is_stopping = threading.Event()
        threading.Thread(target=self._report_loop, name="adapterhub-report", daemon=True).start()

    async def generate(self, prompt: list[int], digest: str | None, pinned_ref: str | None, params: SamplingParams,
                       is_streaming: bool):
        """Streams `Accepted`, then the engine's events (`Delta`*, `Finished`); a 4xx is raised before `Accepted`."""
        if digest is not None:
            self._count("hits" if digest in self.engine.resident() else "misses")
            if serve.get_multiplexed_model_id() == digest:
                self._refs[digest] = pinned_ref
                await self._get_adapter(digest)
        loop = asyncio.get_running_loop()
        # Blocking: a registry read when the pool evicted the adapter meanwhile.
        handle = await asyncio.to_thread(self.engine.submit, prompt, pinned_ref, params, loop, is_streaming)
        try:
            yield Accepted(self.replica)
            async for event in handle.stream():
                yield event
        finally:
            handle.cancel()  # the ingress cancelled the stream (its client left): free the row

    async def load(self, pinned_ref: str) -> str:
        """POST /v1/adapters on the replica Ray Serve picks for this digest; returns the digest."""
        digest = serve.get_multiplexed_model_id()
        self._refs[digest] = pinned_ref
        await self._get_adapter(digest)
        return digest

    async def unload(self, pinned_ref: str) -> str:
        """DELETE /v1/adapters/{ref} on the replica Ray Serve picks for this digest (one holding it, if any)."""
        return await asyncio.wrap_future(await asyncio.to_thread(self.engine.unload_adapter, pinned_ref))

    def snapshot(self) -> dict:
        stats = self.engine.metrics.snapshot()
        with self._lock:
            stats.update(hits=self._counts["hits"], misses=self._counts["misses"])
            stats["adapter_evictions"] += self._counts["evictions"]  # Ray's LRU unloads them, not the pool
        stats.update(replica=self.replica, pid=os.getpid(), resident=self.engine.resident())
        return stats

    async def _load_adapter(self, digest: str) -> _Resident:
        ref = self._refs[digest]  # kept: a second request may retry this load after a failed first one
        self._leaving.discard(digest)  # wanted again before its rows finished: it stays
        try:
            await asyncio.wrap_future(await asyncio.to_thread(self.engine.load_adapter, ref))
        except CapacityError:  # every slot pinned by running rows: the engine installs it when one frees
            log.debug("adapter %s waits for a free slot", ref)
        return _Resident(self, digest, ref)

    async def _unload_adapter(self, digest: str, ref: str) -> None:
        """Ray's LRU dropped `digest`: out of the pool now, or, while rows pin it, as soon as they finish (in the
        background: Ray waits for this before it loads the next adapter)."""
        self._leaving.add(digest)
        if not await self._try_unload(digest, ref):
            asyncio.get_running_loop().create_task(self._unload_when_unpinned(digest, ref))

    async def _unload_when_unpinned(self, digest: str, ref: str) -> None:
        while not await self._try_unload(digest, ref):
            await asyncio.sleep(_UNPIN_POLL_S)

    async def _try_unload(self, digest: str, ref: str) -> bool:
        """True when done: unloaded, gone already, or wanted again."""
        if digest not in self._leaving:
            return True
        try:
            await asyncio.wrap_future(await asyncio.to_thread(self.engine.unload_adapter, ref))
            self._count("evictions")
        except CapacityError:  # pinned by running rows
            return False
        except AdapterHubError as error:  # not in the pool (never installed, or evicted by it)
            log.debug("adapter %s already left the pool: %s", ref, error)
        self._leaving.discard(digest)
        return True

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _report_loop(self) -> None:
        while not self._is_stopping.wait(REPORT_INTERVAL_S):
            try:
                self._board.report.remote(self.snapshot()).result(timeout_s=10)
            except Exception as error:  # the board restarts like any replica: report again next time
                log.debug("metrics report failed: %s", error)

    def __del__(self) -> None:
        self._is_stopping.set()
        self.engine.close()


def _multiplexed(load, capacity: int):
    """`serve.multiplexed` around `load(digest)`. The pool's capacity is a run-time setting, so the loader is
    wrapped when the replica starts rather than decorated; Ray keeps its LRU on the function object, hence a
    plain function (a bound method takes no attributes)."""

    async def load_adapter_by_digest(digest: str):
        return await load(digest)

    return serve.multiplexed(max_num_models_per_replica=capacity)(load_adapter_by_digest)


class _Resident:
    """What the multiplexed loader returns for one digest. When its LRU drops the digest, Ray Serve awaits the
    object's `__del__` attribute before loading the next: `EngineReplica._unload_adapter`. It is an instance
    attribute, not a finalizer: garbage collection must never call into the engine."""

    def __init__(self, replica: EngineReplica, digest: str, ref: str) -> None:
        self.__del__ = functools.partial(replica._unload_adapter, digest, ref)


def _replica_name() -> str:
    context = serve.get_replica_context()
    replica_id = getattr(context, "replica_id", None)
    return getattr(replica_id, "unique_id", None) or str(getattr(context, "replica_tag", os.getpid()))
