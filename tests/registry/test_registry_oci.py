"""OCI remote: a round trip through a real docker-registry (distribution) on 127.0.0.1."""

from __future__ import annotations

import httpx
import pytest

from adapterhub import Registry
from adapterhub.adapter import read_safetensors
from adapterhub.errors import IntegrityError, RemoteError
from adapterhub.registry.oci import OciStore
from adapterhub.registry.oci_client import EnvAuth
from tests.registry.helpers import make_adapter
from tests.registry.hostile_registry import docker_registry as _serve
from tests.registry.hostile_registry import free_port as _free_port


@pytest.fixture(scope="module")
def oci_url(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("oci")) as url:
        yield url


def _uploads(store: OciStore) -> int:
    return sum(n for (method, kind), n in store.client.counts.items() if method in ("POST", "PUT", "PATCH")
               and kind == "uploads")


def test_oci_round_trip_and_second_push_uploads_nothing(oci_url, tmp_path):
    remote = Registry(oci_url)
    adapter = make_adapter(use_dora=True)
    ref = remote.push(adapter, "sql", tags=["prod"])
    assert str(ref) == "sql@v1" and _uploads(remote.backend) == 2 * 13  # POST+PUT per blob: config + 12 tensors
    local = Registry(tmp_path / "empty")
    assert str(remote.copy("sql:prod", local)) == "sql@v1"
    out = local.pull("sql@v1", tmp_path / "out")
    pulled, _ = read_safetensors((out / "adapter_model.safetensors").read_bytes())
    assert pulled == adapter.tensors and local.verify().ok
    assert local.resolve("sql").digest == ref.digest  # same manifest bytes on both sides

    again = Registry(oci_url)
    assert str(again.push(adapter, "sql")) == "sql@v1"
    assert _uploads(again.backend) == 0 and again.backend.client.counts["HEAD", "blobs"] == 13
    v2 = again.push(make_adapter(seed=5, use_dora=True), "sql")
    assert str(v2) == "sql@v2" and again.resolve("sql") == v2 and again.resolve("sql:prod") == ref
    assert "sql" in again.tasks() and again.versions("sql") == [1, 2]
    assert again.load("sql@v2").tensors == make_adapter(seed=5, use_dora=True).tensors


def test_local_to_oci_copy_moves_only_missing_blobs(oci_url, tmp_path):
    local = Registry(tmp_path / "store")
    local.push(make_adapter(seed=7), "chat")
    local.push(make_adapter(seed=8), "chat")
    remote = Registry(oci_url)
    local.copy("chat@v1", remote)
    before = _uploads(remote.backend)
    local.copy("chat@v2", remote)  # v2 shares only the config blob with v1
    assert _uploads(remote.backend) - before == 2 * 8
    assert remote.load("chat@v2").tensors == local.load("chat@v2").tensors
    remote.remove("chat@v2")
    assert remote.versions("chat") == [1] and str(remote.resolve("chat")) == "chat@v1"


def test_corrupt_remote_blob_is_rejected(tmp_path):
    """A registry that serves wrong bytes: the pull fails naming the blob, nothing is written."""
    adapter = make_adapter()
    local = Registry(tmp_path / "store")
    ref = local.push(adapter, "sql")
    manifest_bytes = local.backend.get_manifest("sql", ref.digest)
    tensor = local.manifest("sql").tensors[0].digest

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/tags/list"):
            return httpx.Response(200, json={"tags": ["v1"]})
        if "/manifests/" in path:
            return httpx.Response(200, content=manifest_bytes, headers={"Docker-Content-Digest": ref.digest})
        digest = path.rsplit("/", 1)[1]
        data = local.backend.get_blob("sql", digest)
        return httpx.Response(200, content=data[:-1] + b"\x00" if digest == tensor else data)

    remote = Registry(tmp_path / "unused")
    remote.backend = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler))
    with pytest.raises(IntegrityError, match=tensor):
        remote.pull("sql@v1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bearer_token_challenge_uses_env_credentials(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_OCI_USERNAME", "alice")
    monkeypatch.setenv("ADAPTERHUB_OCI_PASSWORD", "s3cret")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.url.path, request.headers.get("Authorization")))
        if request.url.host == "auth.example":
            assert request.url.params["scope"] == "repository:ns/sql:pull"
            return httpx.Response(200, json={"token": "T0K"})
        if request.headers.get("Authorization") != "Bearer T0K":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token",'
                                                'service="reg",scope="repository:ns/sql:pull"'})
        return httpx.Response(200, json={"tags": []})

    store = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler))
    assert store.versions("sql") == {}
    assert seen[0][0] == "registry.example" and seen[0][2].startswith("Basic ")
    assert seen[1] == ("auth.example", "/token", "Basic YWxpY2U6czNjcmV0")  # base64("alice:s3cret")
    assert seen[2] == ("registry.example", "/v2/ns/sql/tags/list", "Bearer T0K")


@pytest.mark.parametrize("user, password, expected", [
    ("Aladdin", "open sesame", "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),  # RFC 7617 §2
    ("test", "123\u00a3", "Basic dGVzdDoxMjPCow=="),  # RFC 7617 §2.1: UTF-8 ("£" is C2 A3)
    ("alice", None, "Basic YWxpY2U6"),  # no password: "alice:"
])
def test_basic_credentials_from_env_are_sent_as_rfc_7617_basic(monkeypatch, user, password, expected):
    monkeypatch.delenv("ADAPTERHUB_OCI_TOKEN", raising=False)
    monkeypatch.setenv("ADAPTERHUB_OCI_USERNAME", user)
    if password is None:
        monkeypatch.delenv("ADAPTERHUB_OCI_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("ADAPTERHUB_OCI_PASSWORD", password)
    headers = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("Authorization"))
        return httpx.Response(404)

    store = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler))
    assert store.versions("sql") == {} and headers == [expected]
    with httpx.Client(auth=(user, password or ""), transport=httpx.MockTransport(handler)) as client:
        client.get("https://registry.example/v2/")  # what httpx's own BasicAuth sends: the same header
    assert headers[1] == expected


def test_https_unless_loopback_and_unreachable_is_a_clear_error():
    assert OciStore("oci://registry.example:5000/ns").client.base == "https://registry.example:5000"
    store = OciStore(f"oci://127.0.0.1:{_free_port()}/ns")
    assert store.client.base.startswith("http://127.0.0.1")
    with pytest.raises(RemoteError, match="cannot reach"):
        store.versions("sql")


def test_token_from_env_is_sent_as_bearer(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_OCI_TOKEN", "abc")
    headers = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("Authorization"))
        return httpx.Response(404)

    store = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler))
    assert store.versions("sql") == {} and headers == ["Bearer abc"]
    assert EnvAuth({}).token is None and EnvAuth({}).basic is None


def test_chunked_upload_round_trips(oci_url, monkeypatch):
    from adapterhub.registry import oci_client
    monkeypatch.setattr(oci_client, "CHUNK", 1000)  # force PATCH chunks for the 2-8 KiB tensors
    remote = Registry(oci_url)
    adapter = make_adapter(seed=11, r=16)
    remote.push(adapter, "chunked")
    assert remote.backend.client.counts["PATCH", "uploads"] > len(adapter.tensors)
    assert Registry(oci_url).load("chunked").tensors == adapter.tensors


def test_basic_auth_against_a_password_protected_registry(tmp_path, monkeypatch):
    crypt = pytest.importorskip("crypt")  # bcrypt htpasswd entry via the system crypt(3)
    entry = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not entry or not entry.startswith("$2"):
        pytest.skip("the system crypt(3) has no bcrypt")
    (tmp_path / "htpasswd").write_text(f"alice:{entry}\n")
    auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    with _serve(tmp_path, auth) as url:
        for var in ("ADAPTERHUB_OCI_TOKEN", "ADAPTERHUB_OCI_USERNAME", "ADAPTERHUB_OCI_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(RemoteError, match="401.*ADAPTERHUB_OCI_USERNAME"):
            Registry(url).push(make_adapter(), "sql")
        monkeypatch.setenv("ADAPTERHUB_OCI_USERNAME", "alice")
        monkeypatch.setenv("ADAPTERHUB_OCI_PASSWORD", "s3cret")
        assert str(Registry(url).push(make_adapter(), "sql")) == "sql@v1"
        assert Registry(url).load("sql@v1").tensors == make_adapter().tensors
