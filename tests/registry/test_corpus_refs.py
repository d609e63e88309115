"""Bad-input corpus: malformed ref strings, corrupted ref files, CLI misuse.

Every case gives exactly one AdapterHubError (through the CLI: a non-zero exit with one line and no traceback)
that names the bad object, writes nothing, and does not hang. Corrupted ref files are scoped to their own
ref: the other versions of the task and the other tasks keep working, and `ls` names the bad file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapterhub import Registry
from adapterhub.errors import (
    AdapterHubError, BlobNotFoundError, IntegrityError, InvalidNameError, RefNotFoundError, RegistryError,
)
from tests.registry.helpers import assert_one_line_error, cli, make_adapter, store_tree

HEX = "ab" * 32


@pytest.fixture
def store(tmp_path):
    """sql@v1 (tagged prod), sql@v2, chat@v1."""
    registry = Registry(tmp_path / "store")
    registry.push(make_adapter(0), "sql", tags=["prod"])
    registry.push(make_adapter(1), "sql")
    registry.push(make_adapter(2), "chat")
    return registry


def _unchanged(registry: Registry, action):
    """Run `action`, which must raise exactly one AdapterHubError, and check it wrote nothing to the store."""
    before = store_tree(registry.location)
    with pytest.raises(AdapterHubError) as caught:
        action()
    assert store_tree(registry.location) == before
    return caught.value


# --- malformed ref, task and tag strings -----------------------------------------------------------------

# (ref, error type, the part of it the message must name)
BAD_REFS = [
    ("../x", InvalidNameError, "'../x'"),
    ("a/b", InvalidNameError, "'a/b'"),
    ("sql/../../etc", InvalidNameError, "'sql/../../etc'"),
    ("sql\x00", InvalidNameError, "'sql\\x00'"),
    ("sq\x00l@v1", InvalidNameError, "'sq\\x00l'"),
    ("sqł", InvalidNameError, "'sqł'"),
    ("ｓｑｌ", InvalidNameError, "'ｓｑｌ'"),
    ("x" * 65, InvalidNameError, "x" * 65),
    ("", InvalidNameError, "''"),
    ("sql@v0", InvalidNameError, "'sql@v0'"),
    ("sql@v-1", InvalidNameError, "'sql@v-1'"),
    ("sql@v01", InvalidNameError, "'sql@v01'"),
    ("sql@V1", InvalidNameError, "'sql@V1'"),
    ("sql@v1.0", InvalidNameError, "'sql@v1.0'"),
    ("sql@", InvalidNameError, "'sql@'"),
    ("sql@v1@v2", InvalidNameError, "'sql@v1@v2'"),
    ("sql@sha256:zz", InvalidNameError, "'sql@sha256:zz'"),
    (f"sql@sha256:{HEX.upper()}", InvalidNameError, "sha256:AB"),
    (f"sql@sha512:{HEX}{HEX}", InvalidNameError, "sha512:"),
    (f"sql@sha256:{HEX[:-1]}", InvalidNameError, "sha256:"),
    ("sql:", InvalidNameError, "'sql:'"),
    ("@v1", InvalidNameError, "''"),
    (":prod", InvalidNameError, "''"),
    ("SQL", InvalidNameError, "'SQL'"),
    ("Sql:prod", InvalidNameError, "'Sql'"),
    ("sql :prod", InvalidNameError, "'sql '"),
    (" sql", InvalidNameError, "' sql'"),
    ("sql\n", InvalidNameError, "'sql\\n'"),
    ("sq l", InvalidNameError, "'sq l'"),
    ("sql..x", InvalidNameError, "'sql..x'"),
    ("-sql", InvalidNameError, "'-sql'"),
    ("sql:../x", InvalidNameError, "'../x'"),
    ("sql:a/b", InvalidNameError, "'a/b'"),
    ("sql:..", InvalidNameError, "'..'"),
    ("sql:x..y", InvalidNameError, "'x..y'"),
    ("sql:-x", InvalidNameError, "'-x'"),
    ("sql:.hidden", InvalidNameError, "'.hidden'"),
    ("sql:pr od", InvalidNameError, "'pr od'"),
    ("sql:prod\n", InvalidNameError, "'prod\\n'"),
    ("sql:pröd", InvalidNameError, "'pröd'"),
    ("sql::prod", InvalidNameError, "':prod'"),
    ("sql:prod:x", InvalidNameError, "'prod:x'"),
    ("sql:" + "t" * 129, InvalidNameError, "t" * 129),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ref, error, named", BAD_REFS, ids=[repr(r[0])[:40] for r in BAD_REFS])
def test_bad_ref_strings(store, tmp_path, ref, error, named):
    dest = tmp_path / "out"
    for action in (lambda: store.resolve(ref), lambda: store.pull(ref, dest), lambda: store.remove(ref),
                   lambda: store.tag(ref, "x")):
        raised = _unchanged(store, action)
        assert type(raised) is error and named in str(raised), str(raised)
    assert not dest.exists()


BAD_TAGS = [("latest", "reserved"), ("v3", "reserved"), ("a/b", "not allowed"), ("..", "not allowed"),
            ("x..y", "not allowed"), ("-x", "not allowed"), ("", "not allowed"), ("t" * 129, "not allowed"),
            ("p\td", "not allowed"), ("pröd", "not allowed"), ("a\x00", "not allowed")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tag, fragment", BAD_TAGS, ids=[repr(t[0])[:20] for t in BAD_TAGS])
def test_bad_tag_names(store, tag, fragment):
    raised = _unchanged(store, lambda: store.tag("sql@v1", tag))
    assert type(raised) is InvalidNameError and fragment in str(raised) and repr(tag) in str(raised)
    code, output = cli("tag", "-r", store.location, "--", "sql@v1", tag)  # "--": a tag may start with '-'
    assert_one_line_error(code, output, "InvalidNameError")


# --- corrupted ref files -----------------------------------------------------------------------------------


def _write(content: bytes):
    return lambda path, root: path.write_bytes(content)


def _symlink_to_outside(content: bytes):
    def make(path: Path, root: Path) -> None:
        outside = root.parent / "outside.txt"
        outside.write_bytes(content)
        path.unlink()
        path.symlink_to(outside)
    return make


def _directory(path: Path, root: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


def _fifo(path: Path, root: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _missing_manifest(path: Path, root: Path) -> None:
    path.write_text(f"sha256:{HEX}\n")


CORRUPTIONS = {
    "invalid-utf8": _write(b"\xff\xfe\xfa sha256"),
    "empty": _write(b""),
    "whitespace": _write(b"  \n\t\n"),
    "sha256:zz": _write(b"sha256:zz\n"),
    "uppercase-hex": _write(f"sha256:{HEX.upper()}\n".encode()),
    "63-hex": _write(f"sha256:{HEX[:-1]}\n".encode()),
    "two-lines": _write(f"sha256:{HEX}\nsha256:{HEX}\n".encode()),
    "nul-bytes": _write(b"\x00" * 72),
    "huge": _write(b"a" * 100_000),
    "symlink-outside": _symlink_to_outside(b"root:x:0:0:root:/root:/bin/bash\n"),
    "symlink-to-a-digest": _symlink_to_outside(f"sha256:{HEX}\n".encode()),
    "directory": _directory,
    "fifo": _fifo,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_version_file_is_named_and_scoped_to_that_version(store, tmp_path, corruption):
    root = Path(store.location)
    bad = root / "refs" / "sql" / "versions" / "2"
    CORRUPTIONS[corruption](bad, root)
    fix = f"mv {bad}" if corruption == "directory" else "adapterhub rm sql@v2"
    for action in (lambda: store.resolve("sql@v2"), lambda: store.resolve("sql"),
                   lambda: store.pull("sql@v2", tmp_path / "out"), lambda: store.log("sql")):
        raised = _unchanged(store, action)
        assert type(raised) is IntegrityError and str(bad) in str(raised) and fix in str(raised)
    assert not (tmp_path / "out").exists()
    _other_refs_keep_working(store, tmp_path, bad, ["sql@v1"])
    assert store.versions("sql") == [1]
    try:  # gc may refuse to guess what an unreadable ref references; if so it names the file
        store.gc(dry_run=True)
    except IntegrityError as error:
        assert str(bad) in str(error)
    _apply_the_fix(store, bad, "sql@v2", corruption)
    assert store.ref_problems() == [] and str(store.push(make_adapter(5), "sql")) == "sql@v3"  # 2 is not reused


def _apply_the_fix(store: Registry, bad: Path, ref: str, corruption: str) -> None:
    """`adapterhub rm REF` works on an unreadable ref file; a directory it refuses to delete, naming it."""
    if corruption == "directory":
        raised = _unchanged(store, lambda: store.remove(ref))
        assert type(raised) is RegistryError and f"mv {bad}" in str(raised)
        bad.rename(Path(store.location).parent / "moved-aside")
        if ref.endswith("@v2"):  # moved by hand: `rm` would have recorded the number
            (bad.parent.parent / "removed-max").write_text("2\n")
    else:
        store.remove(ref)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("corruption", ["invalid-utf8", "empty", "sha256:zz", "symlink-to-a-digest", "directory",
                                        "huge"])
def test_a_corrupt_tag_file_is_named_and_scoped_to_that_tag(store, tmp_path, corruption):
    root = Path(store.location)
    bad = root / "refs" / "sql" / "tags" / "prod"
    CORRUPTIONS[corruption](bad, root)
    raised = _unchanged(store, lambda: store.pull("sql:prod", tmp_path / "out"))
    fix = f"mv {bad}" if corruption == "directory" else "adapterhub rm sql:prod"
    assert type(raised) is IntegrityError and str(bad) in str(raised) and fix in str(raised)
    _other_refs_keep_working(store, tmp_path, bad, ["sql@v1", "sql@v2", "sql"])
    _apply_the_fix(store, bad, "sql:prod", corruption)
    assert store.ref_problems() == [] and store.tags("sql") == {}


def _other_refs_keep_working(store: Registry, tmp_path: Path, bad: Path, refs: list[str]) -> None:
    for i, ref in enumerate(refs + ["chat", "chat@v1"]):
        store.pull(ref, tmp_path / f"ok{i}")
    problems = store.ref_problems()
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: ")
    code, output = cli("ls", "-r", store.location)
    assert code == 0 and "chat\t1 versions" in output and f"warning: {bad}: " in output
    code, output = cli("ls", "sql", "-r", store.location)
    assert code == 0 and "sql@v1" in output and f"warning: {bad}: " in output and "Traceback" not in output
    assert cli("log", "chat", "-r", store.location)[1].startswith("chat@v1")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("corruption", ["invalid-utf8", "empty", "sha256:zz", "symlink-outside", "directory",
                                        "minus-one", "fraction"])
def test_a_corrupt_removed_max_is_refused_never_guessed(store, tmp_path, corruption):
    """removed-max keeps removed numbers from being handed out again: unreadable, it blocks pushes and
    removals of that task (naming the file and the fix), never the other tasks or reads."""
    root = Path(store.location)
    store.remove("sql@v2")
    path = root / "refs" / "sql" / "removed-max"
    assert path.read_text() == "2\n"
    extra = {"minus-one": _write(b"-1\n"), "fraction": _write(b"2.5\n")}
    {**CORRUPTIONS, **extra}[corruption](path, root)
    for action in (lambda: store.push(make_adapter(7), "sql"), lambda: store.remove("sql@v1")):
        raised = _unchanged(store, action)
        assert type(raised) is IntegrityError and str(path) in str(raised) and "echo" in str(raised)
    assert_one_line_error(*cli("rm", "sql@v1", "-r", store.location), str(path))
    store.pull("sql@v1", tmp_path / "ok")
    assert str(store.push(make_adapter(8), "chat")) == "chat@v2"
    assert [p.split(":")[0] for p in store.ref_problems()] == [str(path)]


@pytest.mark.timeout(30)
def test_a_ref_naming_a_missing_manifest_is_named(store, tmp_path):
    root = Path(store.location)
    _missing_manifest(root / "refs" / "sql" / "versions" / "2", root)
    raised = _unchanged(store, lambda: store.pull("sql@v2", tmp_path / "out"))
    assert type(raised) is BlobNotFoundError and "sql@v2" in str(raised) and HEX in str(raised)
    assert not (tmp_path / "out").exists()
    store.pull("sql@v1", tmp_path / "ok")
    problems: list[str] = []
    assert [str(e.ref) for e in store.log("sql", problems)] == ["sql@v1"] and "sql@v2" in problems[0]


# --- CLI misuse --------------------------------------------------------------------------------------------


def _plain_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.txt"
    path.write_text("not a store")
    return path


CLI_MISUSE = [
    # (name, args with {store} / {file} / {tmp} filled in, what the one-line message must name)
    ("pull onto a file", ["pull", "sql@v1", "-o", "{file}"], ["{file}", "ConfigError"]),
    ("pull onto /proc", ["pull", "sql@v1", "-o", "/proc/adapterhub-x"], ["/proc/adapterhub-x", "ConfigError"]),
    ("pull onto non-empty", ["pull", "sql@v1", "-o", "{tmp}"], ["{tmp}", "--force"]),
    ("pull a missing version", ["pull", "sql@v9", "-o", "{tmp}/new"], ["sql@v9", "RefNotFoundError"]),
    ("pull a missing task", ["pull", "nothing", "-o", "{tmp}/new"], ["nothing", "RefNotFoundError"]),
    ("tag a missing version", ["tag", "sql@v9", "prod"], ["sql@v9", "RefNotFoundError"]),
    ("tag a missing tag", ["tag", "sql:nope", "prod"], ["sql:nope", "RefNotFoundError"]),
    ("tag a reserved name", ["tag", "sql@v1", "latest"], ["'latest'", "InvalidNameError"]),
    ("rm a missing version", ["rm", "sql@v9"], ["sql@v9", "RefNotFoundError"]),
    ("rm a missing tag", ["rm", "sql:nope"], ["sql:nope", "RefNotFoundError"]),
    ("rm a bad ref", ["rm", "sql@v-1"], ["sql@v-1", "InvalidNameError"]),
    ("show a bad ref", ["show", "sql@sha256:zz"], ["sql@sha256:zz", "InvalidNameError"]),
    ("log a bad task", ["log", "../x"], ["'../x'", "InvalidNameError"]),
    ("ls a bad task", ["ls", "a/b"], ["'a/b'", "InvalidNameError"]),
    ("registry is a file: ls", ["ls", "-r", "{file}"], ["{file}", "RegistryError"]),
    ("registry is a file: pull", ["pull", "sql@v1", "-r", "{file}"], ["{file}", "RegistryError"]),
    ("registry under a file: push", ["push", "{tmp}", "sql", "-r", "{file}/store"], ["{file}", "RegistryError"]),
    ("registry /etc/passwd", ["log", "sql", "-r", "/etc/passwd"], ["/etc/passwd", "RegistryError"]),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, args, names", CLI_MISUSE, ids=[c[0] for c in CLI_MISUSE])
def test_cli_misuse_is_one_line(store, tmp_path, monkeypatch, name, args, names):
    monkeypatch.setenv("ADAPTERHUB_HOME", store.location)
    workdir = tmp_path / "work"
    make_adapter(3).save_peft_dir(workdir)  # a non-empty directory (and a valid adapter to push)
    values = {"store": store.location, "file": str(_plain_file(tmp_path)), "tmp": str(workdir)}
    before = store_tree(store.location), store_tree(workdir), (tmp_path / "plain.txt").read_text()
    code, output = cli(*(a.format(**values) for a in args))
    assert_one_line_error(code, output, *(n.format(**values) for n in names))
    assert (store_tree(store.location), store_tree(workdir), (tmp_path / "plain.txt").read_text()) == before
    assert not (workdir / "new").exists()


@pytest.mark.timeout(30)
def test_rm_twice_second_is_a_one_line_not_found(store):
    for ref in ("sql:prod", "sql@v2"):
        assert cli("rm", ref, "-r", store.location)[0] == 0
        assert_one_line_error(*cli("rm", ref, "-r", store.location), ref, "RefNotFoundError")
    with pytest.raises(RefNotFoundError, match="sql@v2 does not exist"):
        store.remove("sql@v2")


@pytest.mark.timeout(30)
def test_a_dangling_tag_says_so(store):
    """A tag naming a manifest that is no version (left by an older adapterhub) is named, with the fix."""
    root = Path(store.location)
    (root / "refs" / "sql" / "tags" / "old").write_text(f"sha256:{HEX}\n")
    with pytest.raises(RefNotFoundError, match="sql:old names manifest sha256:abab.* dangling tag.*adapterhub rm"):
        store.resolve("sql:old")
    assert set(store.tags("sql")) == {"prod"}
