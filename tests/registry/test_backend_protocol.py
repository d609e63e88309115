"""Every backend satisfies `Backend` with the protocol's exact signatures, and the facades call nothing else:
a backend (or a caller) that drifts from the protocol fails here, not in a user's push."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import httpx
import pytest

from adapterhub import Registry
from adapterhub.errors import RegistryError
from adapterhub.registry import backend, transfer
from adapterhub.registry import registry as registry_module
from adapterhub.registry.backend import BACKENDS, Backend, MaintainableBackend, open_backend
from adapterhub.registry.local import LocalStore
from adapterhub.registry.oci import OciStore


def _methods(protocol) -> list[str]:
    """The methods a protocol class itself declares (not those of the protocols it extends)."""
    return sorted(name for name, value in vars(protocol).items() if inspect.isfunction(value) and name[0] != "_")


BACKEND_METHODS = _methods(Backend)
MAINTENANCE_METHODS = _methods(MaintainableBackend)


def _mismatches(implementation: type, protocol) -> list[str]:
    """One line per protocol method that `implementation` lacks or declares with other parameters."""
    problems = []
    for name in _methods(protocol):
        method = getattr(implementation, name, None)
        if not callable(method):
            problems.append(f"{implementation.__name__}.{name} is missing")
            continue
        expected, actual = inspect.signature(getattr(protocol, name)), inspect.signature(method)
        if actual != expected:
            problems.append(f"{implementation.__name__}.{name}{actual} != {protocol.__name__}.{name}{expected}")
    return problems


def _oci_store() -> OciStore:
    return OciStore("oci://registry.example/ns", transport=httpx.MockTransport(lambda request: httpx.Response(404)))


def test_the_protocol_lists_every_operation():
    assert BACKEND_METHODS == ["delete_tag", "delete_version", "get_blob", "get_manifest", "has_blob", "lookup",
                               "publish", "put_blob", "session", "set_tag", "tags", "tasks", "versions"]
    assert isinstance(inspect.getattr_static(Backend, "location"), property)
    assert MAINTENANCE_METHODS == ["execute_gc", "plan_gc", "verify"]
    for name in BACKEND_METHODS + MAINTENANCE_METHODS:  # each states its contract
        assert (inspect.getdoc(getattr(MaintainableBackend, name)) or "").strip(), name


@pytest.mark.parametrize("implementation", [LocalStore, OciStore])
def test_backends_declare_every_protocol_method_with_its_signature(implementation):
    assert _mismatches(implementation, Backend) == []


def test_the_local_store_alone_is_maintainable(tmp_path):
    local, remote = LocalStore(tmp_path), _oci_store()
    assert isinstance(local, Backend) and isinstance(remote, Backend)
    assert local.location == str(tmp_path) and remote.location == "oci://registry.example/ns"
    assert isinstance(local, MaintainableBackend) and _mismatches(LocalStore, MaintainableBackend) == []
    assert not isinstance(remote, MaintainableBackend)
    on_remote = Registry(tmp_path)
    on_remote.backend = remote
    for operation in (on_remote.verify, on_remote.gc):
        with pytest.raises(RegistryError, match="works on local stores; oci://registry.example/ns is a remote"):
            operation()


def test_a_drifted_backend_is_caught():
    """The checks above must be able to fail: a changed parameter and a missing method are both reported."""

    class Drifted(LocalStore):
        def put_blob(self, task: str, digest: str, raw: bytes) -> bool:  # lost `width`
            return True

    Drifted.tags = None
    problems = _mismatches(Drifted, Backend)
    assert len(problems) == 2, problems
    assert problems[0].startswith("Drifted.put_blob(") and "width" in problems[0].split("!=")[1]
    assert problems[1] == "Drifted.tags is missing"


def _backend_calls(module, receivers: set[str]) -> set[str]:
    """Attribute names the module reads on `self.backend` or on a local named in `receivers`."""
    tree = ast.parse(Path(module.__file__).read_text())
    calls = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in receivers:
            calls.add(node.attr)
        elif isinstance(owner, ast.Attribute) and owner.attr == "backend" and isinstance(owner.value, ast.Name) \
                and owner.value.id == "self":
            calls.add(node.attr)
    return calls


def test_the_registry_and_transfers_call_only_protocol_methods():
    known = set(BACKEND_METHODS) | {"location"}
    assert _backend_calls(registry_module, set()) <= known
    assert _backend_calls(transfer, {"src", "dst"}) <= known
    assert {"publish", "session", "has_blob", "put_blob", "get_blob", "get_manifest"} <= \
        _backend_calls(transfer, {"src", "dst"})  # the walk sees the calls it must see
    # maintenance goes through the narrower protocol, reached via `store = self._maintainable(...)`
    assert _backend_calls(registry_module, {"store"}) - known == {"execute_gc", "plan_gc"}


class FakeStore:
    """Stands in for a new backend module (an S3 or HF Hub store): only its table entry matters here."""

    def __init__(self, location: str):
        self.location = location


def test_open_backend_picks_by_scheme_and_a_new_backend_is_one_table_entry(tmp_path, monkeypatch):
    assert isinstance(open_backend(tmp_path), LocalStore)
    assert isinstance(open_backend("oci://127.0.0.1:5000/team"), OciStore)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    assert open_backend(None).location == str(tmp_path / "home")
    with pytest.raises(RegistryError, match="scheme 's3://'.*directory path or one of: oci://"):
        open_backend("s3://bucket/adapters")
    monkeypatch.setitem(BACKENDS, "s3", f"{__name__}:FakeStore")
    assert isinstance(open_backend("s3://bucket/adapters"), FakeStore)
    assert backend.BACKENDS["oci"] == "adapterhub.registry.oci:OciStore"
