"""`copy` carries tags: by default those naming the copied version, or exactly `--tags a,b`, to a local and
to an OCI destination (a real docker-registry on 127.0.0.1)."""

from __future__ import annotations

import pytest

from adapterhub import Registry
from tests.registry.helpers import cli, make_adapter
from tests.registry.hostile_registry import docker_registry


@pytest.fixture(scope="module")
def oci_url(tmp_path_factory):
    with docker_registry(tmp_path_factory.mktemp("oci-tags")) as url:
        yield url


def _source(path, task: str) -> Registry:
    """TASK@v1 tagged prod and stable, TASK@v2 tagged beta."""
    registry = Registry(path)
    registry.push(make_adapter(seed=1), task, tags=["prod", "stable"])
    registry.push(make_adapter(seed=2), task, tags=["beta"])
    return registry


def _tags(registry: Registry, task: str) -> dict[str, int]:
    return {tag: ref.version for tag, ref in registry.tags(task).items()}


@pytest.mark.parametrize("where", ["local", "oci"])
def test_copy_keeps_the_versions_tags_by_default_and_tags_selects_them(tmp_path, oci_url, where):
    task = f"tagged-{where}"  # one registry server serves the whole module
    source = _source(tmp_path / "src", task)
    to = str(tmp_path / "dst") if where == "local" else oci_url
    code, output = cli("copy", f"{task}:prod", "--to", to, "-r", source.location)
    assert code == 0 and output.rstrip().endswith(f"{task}@v1 → {to}"), output  # after the progress bar
    dst = Registry(to)
    assert _tags(dst, task) == {"prod": 1, "stable": 1}

    code, output = cli("copy", f"{task}@v2", "--to", to, "-r", source.location, "--tags", "stable, rc")
    assert code == 0, output
    assert _tags(dst, task) == {"prod": 1, "stable": 2, "rc": 2}  # beta is not carried: --tags names them all
    assert dst.resolve(task).version == 2 and dst.load(f"{task}:rc").tensors == make_adapter(seed=2).tensors

    code, output = cli("copy", f"{task}@v1", "--to", to, "-r", source.location, "--tags", "")
    assert code == 0 and _tags(dst, task) == {"prod": 1, "stable": 2, "rc": 2}, output  # none: nothing moved


def test_copy_tags_through_the_api_and_a_bad_tag_is_refused_before_copying(tmp_path):
    source = _source(tmp_path / "src", "sql")
    dst = Registry(tmp_path / "api")
    assert str(source.copy("sql:beta", dst)) == "sql@v2" and _tags(dst, "sql") == {"beta": 2}
    code, output = cli("copy", "sql@v1", "--to", tmp_path / "bad", "-r", source.location, "--tags", "v7")
    assert code != 0 and "v7" in output and not (tmp_path / "bad").exists()
