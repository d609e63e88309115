"""Pulling into a destination: never silently over a user's files, replaced as a whole, old-or-new after
kill -9 at any point, leftovers of killed pulls cleaned by the next pull, the user's umask respected."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from adapterhub import Registry, fsio
from adapterhub.adapter import CONFIG_FILE, WEIGHTS_FILE, random_adapter
from adapterhub.errors import ConfigError, RegistryError
from tests.registry.helpers import assert_one_line_error, cli

SHAPES = {f"model.layers.{i}.self_attn.{p}": (256, 256) for i in range(2) for p in ("q_proj", "v_proj")}


@pytest.fixture
def store(tmp_path):
    """sql@v1 (r=8) and sql@v2 (r=4): different config and different weights."""
    registry = Registry(tmp_path / "store")
    registry.push(random_adapter(SHAPES, r=8, seed=1), "sql")
    registry.push(random_adapter(SHAPES, r=4, seed=2), "sql")
    return registry


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _expected(registry: Registry, ref: str) -> dict[str, bytes]:
    adapter = registry.load(ref)
    return {CONFIG_FILE: adapter.config_json().encode(), WEIGHTS_FILE: adapter.safetensors_bytes()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".ahpull-" in p.name)


def test_a_non_empty_destination_is_refused_unless_force_then_replaced_whole(store, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"{dest} exists and is not empty; pass --force"):
        store.pull("sql@v1", dest)
    assert _files(dest) == {"notes.txt": b"mine"}  # untouched
    store.pull("sql@v1", dest, force=True)
    assert _files(dest) == _expected(store, "sql@v1")  # replaced as a whole: notes.txt is gone
    store.pull("sql@v2", dest, force=True)
    assert _files(dest) == _expected(store, "sql@v2") and _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _files(store.pull("sql@v1", empty)) == _expected(store, "sql@v1")  # an empty dir is fine
    assert _files(store.pull("sql@v1", tmp_path / "new" / "deeper")) == _expected(store, "sql@v1")


def test_cli_pull_refuses_then_replaces_with_force(store, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "store"))
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("{}")
    assert_one_line_error(*cli("pull", "sql@v2", "-o", dest), str(dest), "--force", "ConfigError")
    assert _files(dest) == {"adapter_config.json": b"{}"}
    code, output = cli("pull", "sql@v2", "-o", dest, "--force")
    assert code == 0 and "sql@v2" in output and _files(dest) == _expected(store, "sql@v2")


def test_pulled_files_get_the_users_umask_not_0600(store, tmp_path):
    old = os.umask(0o027)
    try:
        out = store.pull("sql@v1", tmp_path / "out")
        replaced = store.pull("sql@v2", out, force=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and stat.S_IMODE(replaced.stat().st_mode) == 0o750
    assert {stat.S_IMODE((out / name).stat().st_mode) for name in (CONFIG_FILE, WEIGHTS_FILE)} == {0o640}


@pytest.mark.parametrize("make", ["file", "symlink"])
def test_a_file_or_symlink_destination_is_refused_naming_it(store, tmp_path, make):
    dest = tmp_path / "dest"
    if make == "file":
        dest.write_text("keep me")
    else:
        (tmp_path / "target").mkdir()
        dest.symlink_to(tmp_path / "target")
    for force in (False, True):
        with pytest.raises(ConfigError, match=f"destination {dest} is a {make}"):
            store.pull("sql@v1", dest, force=force)
    assert (make == "file" and dest.read_text() == "keep me") or list((tmp_path / "target").iterdir()) == []


def test_unwritable_destination_and_file_registry_are_one_line_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="cannot write the adapter to /proc/adapterhub-x"):
        store.pull("sql@v1", "/proc/adapterhub-x")
    (tmp_path / "plain").write_text("not a store")
    for location in (tmp_path / "plain", tmp_path / "plain" / "below"):
        with pytest.raises(RegistryError, match=f"registry location {location} .*not a directory"):
            Registry(location)
    assert_one_line_error(*cli("pull", "sql@v1", "-o", "/proc/adapterhub-x", "-r", tmp_path / "store"),
                          "/proc/adapterhub-x")
    assert_one_line_error(*cli("ls", "-r", tmp_path / "plain"), str(tmp_path / "plain"))


def test_a_file_written_into_the_destination_meanwhile_is_not_lost(store, tmp_path, monkeypatch):
    """Without force the new dir is renamed in only over an empty one: the kernel refuses a non-empty dir."""
    dest = tmp_path / "out"
    real = fsio.fsync_dir

    def user_writes_meanwhile(path):
        real(path)
        if ".ahpull-" in Path(path).name:  # the temp dir is complete: just before the swap
            dest.mkdir(exist_ok=True)
            (dest / "late.txt").write_text("mine")

    monkeypatch.setattr(fsio, "fsync_dir", user_writes_meanwhile)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        store.pull("sql@v1", dest)
    assert _files(dest) == {"late.txt": b"mine"} and _leftovers(tmp_path) == []


def _killed_pull(registry: Registry, ref: str, dest: Path, patch) -> None:
    """Fork a child that pulls `ref` into `dest` (force) with `patch` applied, which SIGKILLs it somewhere."""
    pid = os.fork()
    if pid == 0:
        try:
            patch()
            registry.pull(ref, dest, force=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _after_calls(module, name: str, calls: int, before: bool = False):
    """A patch: SIGKILL before (or after) call number `calls` of module.name."""
    real = getattr(module, name)
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if before and count[0] == calls:
            _die()
        result = real(*args, **kwargs)
        if not before and count[0] == calls:
            _die()
        return result

    return lambda: setattr(module, name, wrapped)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point, expect", [
    ((fsio, "_write_fd", 1, False), "sql@v1"),  # one file of the new dir written
    ((fsio, "_swap_in", 1, True), "sql@v1"),  # the new dir complete, not yet swapped in
    ((fsio, "_swap_in", 1, False), "sql@v2"),  # swapped in; the temp dir holds the old one
])
def test_kill_at_each_step_leaves_old_or_new_and_the_next_pull_cleans_up(store, tmp_path, point, expect):
    dest = store.pull("sql@v1", tmp_path / "out")
    _killed_pull(store, "sql@v2", dest, _after_calls(*point))
    assert _files(dest) == _expected(store, expect)
    assert len(_leftovers(tmp_path)) == 1  # what the killed pull left
    store.pull("sql@v1", tmp_path / "other")  # any pull into the same parent removes it
    assert _leftovers(tmp_path) == [] and _files(dest) == _expected(store, expect)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_without_an_atomic_exchange_a_crash_between_renames_is_repaired(store, tmp_path):
    """The fallback (no renameat2): dest moved aside, then the new dir renamed in. Killed in between, dest
    is missing for a moment; the next pull into the parent moves the old dir back."""
    dest = store.pull("sql@v1", tmp_path / "out")

    def no_exchange_and_die_after_moving_dest_aside():
        fsio._exchange = lambda a, b: False
        _after_calls(os, "rename", 1)()

    _killed_pull(store, "sql@v2", dest, no_exchange_and_die_after_moving_dest_aside)
    assert not dest.exists() and [n.endswith("-old") for n in _leftovers(tmp_path)] == [False, True]  # new, old
    store.pull("sql@v2", tmp_path / "other")
    assert _files(dest) == _expected(store, "sql@v1") and _leftovers(tmp_path) == []


def test_clean_stale_dirs_removes_only_its_own_dead_or_old_temp_dirs(tmp_path, monkeypatch):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # `pid` is now a dead process
    dead, alive = f".out.ahpull-{pid}-{'0' * 16}", f".out.ahpull-{os.getppid()}-{'1' * 16}"
    kept = [".out.ahpull-1-short", ".git", "out", ".out.tmp", alive]
    for name in [dead, *kept]:
        (tmp_path / name).mkdir()
    (tmp_path / f".x.ahpull-{pid}-{'2' * 16}").write_text("a file, not a temp dir")
    kept.append(f".x.ahpull-{pid}-{'2' * 16}")
    assert fsio.clean_stale_dirs(tmp_path) == [tmp_path / dead]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    monkeypatch.setattr(fsio, "STALE_SECONDS", -1)  # the live pid's dir, once old enough, is stale too
    assert fsio.clean_stale_dirs(tmp_path) == [tmp_path / alive]


def _kill_self_at_fsio_line(kill_at: int | None) -> list[int]:
    """Trace the lines run in fsio (where every write, fsync and rename of a pull happens) and SIGKILL this
    process when the `kill_at`-th runs; returns the counter (a one-item list) for a counting run."""
    target, count = fsio.__file__, [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == target else None)
    return count


def _pull_in_child(store_dir: Path, ref: str, dest: Path, kill_at: int | None) -> int:
    """Fork; the child pulls `ref` over `dest`, killed by itself at fsio line `kill_at`; returns the wait status."""
    pid = os.fork()
    if pid == 0:  # child: leave without running any pytest cleanup
        try:
            _kill_self_at_fsio_line(kill_at)
            Registry(store_dir).pull(ref, dest, force=True)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.timeout(300)
def test_kill_9_at_every_line_of_a_pull_leaves_old_or_new_never_mixed(store, tmp_path):
    dest = store.pull("sql@v1", tmp_path / "out")
    versions = {ref: _expected(store, ref) for ref in ("sql@v1", "sql@v2")}
    count = _kill_self_at_fsio_line(None)
    store.pull("sql@v2", tmp_path / "counted")  # how many fsio lines a pull runs (more with leftovers to clean)
    sys.settrace(None)
    lines = count[0]
    assert lines > 20
    killed, left, seen = 0, 0, set()
    for kill_at in range(1, lines + 1):
        ref = f"sql@v{kill_at % 2 + 1}"
        status = _pull_in_child(tmp_path / "store", ref, dest, kill_at)
        killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        now = _files(dest)
        assert now in versions.values()  # old or new, whole
        seen.add(now == versions[ref])
        left += bool(_leftovers(tmp_path))
    assert killed == lines  # every pull really was cut short, ...
    assert left > 0 and seen == {True, False}  # ... some mid-write, some before the swap, some after it
    store.pull("sql@v1", dest, force=True)
    assert _files(dest) == versions["sql@v1"] and _leftovers(tmp_path) == []
