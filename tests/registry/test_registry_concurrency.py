"""Concurrent pushes and kill -9 at random points of a push."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest

from adapterhub import Registry
from adapterhub.adapter import random_adapter

TINY = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 8)}


def _push_many(root: str, worker: int, count: int, queue) -> None:
    registry = Registry(root)
    for i in range(count):
        seed = worker * 1000 + i
        queue.put((seed, str(registry.push(random_adapter(TINY, r=2, seed=seed), "race"))))


def test_8_processes_x_25_pushes_get_200_consecutive_versions(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_push_many, args=(str(tmp_path), w, 25, queue)) for w in range(8)]
    for w in workers:
        w.start()
    pushed = dict(queue.get(timeout=120) for _ in range(200))
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    registry = Registry(tmp_path)
    assert registry.versions("race") == list(range(1, 201))
    assert sorted(pushed.values(), key=lambda r: int(r.split("@v")[1])) == [f"race@v{n}" for n in range(1, 201)]
    for seed in random.Random(0).sample(sorted(pushed), 20):  # each version holds what its pusher sent
        assert registry.load(pushed[seed]).tensors == random_adapter(TINY, r=2, seed=seed).tensors
    assert registry.verify().ok


SHAPES = {f"model.layers.{i}.self_attn.{p}": (64, 64) for i in range(2) for p in ("q_proj", "v_proj")}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_9_at_random_points_of_a_push_leaves_no_partial_version(tmp_path):
    registry = Registry(tmp_path)
    registry.push(random_adapter(SHAPES, seed=999), "crash")  # a version that must survive every crash
    adapters = [random_adapter(SHAPES, seed=s, use_dora=s % 2 == 1) for s in range(4)]
    start = time.perf_counter()
    Registry(tmp_path / "timing").push(adapters[0], "crash")
    duration = time.perf_counter() - start
    rng = random.Random(0)
    completed = 0
    for trial in range(60):
        adapter = adapters[trial % 4]
        pid = os.fork()
        if pid == 0:  # child: push, then leave without running any pytest cleanup
            try:
                Registry(tmp_path).push(adapter, "crash", tags=["wip"])
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 1.5 * duration))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        completed += os.WIFEXITED(status)
        check = Registry(tmp_path)
        assert check.verify().ok
        for version in check.versions("crash"):  # every visible version is complete and loads
            check.load(f"crash@v{version}")
        if "wip" in check.tags("crash"):
            check.load("crash:wip")
    assert completed < 60  # most pushes really were interrupted
    final = Registry(tmp_path)
    for adapter in adapters:  # the interrupted pushes succeed when repeated
        assert final.load(str(final.push(adapter, "crash"))).tensors == adapter.tensors
    assert final.load("crash@v1").tensors == random_adapter(SHAPES, seed=999).tensors
    assert final.verify().ok
    assert list((tmp_path / "tmp").iterdir())  # some kills landed between a temp write and its rename
    final.gc(dry_run=False)  # temp files of the killed pushes are garbage
    assert not list((tmp_path / "tmp").iterdir()) and final.verify().ok
