"""Refs under concurrent processes: readers never crash while tags and versions come and go, and a tag racing
an `rm` of its version never leaves a tag naming a removed version (real processes, spawn context)."""

from __future__ import annotations

import multiprocessing
import time
import traceback

import pytest

from adapterhub import Registry
from adapterhub.adapter import random_adapter
from adapterhub.errors import RefNotFoundError

TINY = {"model.layers.0.self_attn.q_proj": (8, 8)}
TAGS = [f"t{i}" for i in range(40)]


def _adapter(seed: int):
    return random_adapter(TINY, r=2, seed=seed)


def _churn(root: str, worker: int, seconds: float, queue) -> None:
    """Moves and removes many tags, and pushes and removes versions, until `seconds` have passed."""
    registry = Registry(root)
    deadline, i, errors = time.monotonic() + seconds, 0, []
    while time.monotonic() < deadline:
        i += 1
        tag = TAGS[(i * 7 + worker) % len(TAGS)]
        try:
            registry.tag("churn", tag)
            registry.remove(f"churn:{tag}")
            if i % 10 == worker:
                ref = registry.push(_adapter(worker * 100_000 + i), "churn", tags=[tag])
                registry.remove(str(ref))
        except RefNotFoundError:
            pass  # the other churner removed it first: expected
        except Exception:  # noqa: BLE001 - any other error is a crash to report
            errors.append(traceback.format_exc())
    queue.put(("churn", i, errors))


def _read(root: str, seconds: float, queue) -> None:
    """Lists and logs the churning task through the library and the CLI; every exception is a crash."""
    from tests.registry.helpers import cli
    registry = Registry(root)
    deadline, runs, errors = time.monotonic() + seconds, 0, []
    while time.monotonic() < deadline:
        runs += 1
        try:
            registry.log("churn")
            registry.tags("churn")
            registry.versions("churn")
            registry.tasks()
            for args in (("log", "churn", "--registry", root), ("ls", "--registry", root)):
                code, output = cli(*args)
                if code != 0:
                    errors.append(output)
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc())
    queue.put(("read", runs, errors))


@pytest.mark.timeout(120)
def test_readers_never_crash_while_tags_and_versions_churn(tmp_path):
    registry = Registry(tmp_path)
    for seed in range(3):
        registry.push(_adapter(seed), "churn", tags=TAGS if seed == 0 else ())
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_churn, args=(str(tmp_path), w, 4.0, queue)) for w in range(2)]
    workers += [context.Process(target=_read, args=(str(tmp_path), 4.0, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=100) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    reads = sum(runs for kind, runs, _ in results if kind == "read")
    churns = sum(runs for kind, runs, _ in results if kind == "churn")
    assert reads >= 10 and churns >= 50  # both sides really ran concurrently
    crashes = [error for _, _, errors in results for error in errors]
    assert crashes == [], f"{len(crashes)} crashes, the first:\n{crashes[0]}"
    assert registry.ref_problems() == [] and registry.verify().ok


def _tag_all(root: str, versions: list[int], name: str, start, queue) -> None:
    registry = Registry(root)
    start.wait()
    errors = []
    for version in versions:
        try:
            registry.tag(f"race@v{version}", name)
        except RefNotFoundError:
            pass  # rm won: the version is gone, so the tag must not be written
        except Exception:  # noqa: BLE001 - reported, so the test fails with it instead of waiting
            errors.append(traceback.format_exc())
    queue.put(errors)


def _remove_all(root: str, versions: list[int], start, queue) -> None:
    registry = Registry(root)
    start.wait()
    errors = []
    for version in versions:
        try:
            registry.remove(f"race@v{version}")
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc())
    queue.put(errors)


@pytest.mark.timeout(120)
def test_tag_racing_rm_never_leaves_a_tag_on_a_removed_version(tmp_path):
    """Each tagger moves its tag along versions 1..N while a remover deletes them in the same order: at the
    end every tag names a version that exists, or is absent."""
    registry = Registry(tmp_path)
    count = 120
    for seed in range(count):
        registry.push(_adapter(seed), "race")
    registry.push(_adapter(count), "race", tags=["keep"])
    doomed = list(range(1, count + 1))
    context = multiprocessing.get_context("spawn")
    queue, start = context.Queue(), context.Event()
    workers = [context.Process(target=_tag_all, args=(str(tmp_path), doomed, f"tag{i}", start, queue))
               for i in range(3)]
    workers.append(context.Process(target=_remove_all, args=(str(tmp_path), doomed, start, queue)))
    for w in workers:
        w.start()
    time.sleep(1.0)  # let every spawned interpreter import adapterhub, so they really start together
    start.set()
    errors = [error for _ in workers for error in queue.get(timeout=100)]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    versions = registry.backend.versions("race")
    dangling = {tag: digest for tag, digest in registry.backend.tags("race").items()
                if digest not in versions.values()}
    assert dangling == {}
    assert errors == [], f"{len(errors)} errors, the first:\n{errors[0]}"
    assert sorted(versions) == [count + 1]
    assert set(registry.tags("race")) <= {"keep", "tag0", "tag1", "tag2"} and "keep" in registry.tags("race")
