"""The OCI remote against a hostile registry: a proxy in front of a real docker-registry that swaps content,
bloats answers, stalls and points elsewhere (tests/registry/hostile_registry.py).

Each case must end in one AdapterHubError whose one-line message names the object, within seconds, with
nothing written locally and no credentials seen by any origin but the registry's (oci_client.py docstring).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest
from click.testing import CliRunner

from adapterhub import Registry
from adapterhub.cli import main
from adapterhub.errors import AdapterHubError, IntegrityError, InvalidNameError, RefNotFoundError, RemoteError
from adapterhub.registry import oci_client
from adapterhub.registry.blobs import encode
from adapterhub.registry.digest import Digest
from adapterhub.registry.manifest import MANIFEST_MEDIA_TYPE, canonical_json
from adapterhub.registry.oci import OciStore
from adapterhub.registry.refs import ResolvedRef
from adapterhub.registry.transfer import send_blobs
from tests.registry.helpers import make_adapter
from tests.registry.hostile_registry import HostileRegistry, Reply, docker_registry, endless, trickle

MB = 1024 * 1024
OVERSIZE = 600 * MB
SENT_BOUND = 64 * MB  # what may leave a server (socket buffers) before a capped client hangs up
MANIFEST = {"Content-Type": MANIFEST_MEDIA_TYPE}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with docker_registry(tmp_path_factory.mktemp("oci")) as url:
        yield url


@pytest.fixture
def hostile(upstream):
    with HostileRegistry(upstream) as proxy:
        yield proxy


@pytest.fixture
def elsewhere():
    """Another origin: 404 unless a rule answers; records every Authorization header it gets."""
    with HostileRegistry(None) as recorder:
        yield recorder


@pytest.fixture
def credentials(monkeypatch):
    """Basic credentials in the environment (docker-registry without auth ignores them); the header value."""
    monkeypatch.delenv("ADAPTERHUB_OCI_TOKEN", raising=False)
    monkeypatch.setenv("ADAPTERHUB_OCI_USERNAME", "alice")
    monkeypatch.setenv("ADAPTERHUB_OCI_PASSWORD", "s3cret")
    return "Basic YWxpY2U6czNjcmV0"


def _push(upstream: str, task: str, *seeds: int) -> list[tuple[ResolvedRef, bytes]]:
    """One version per seed, pushed straight to the real registry: [(ref, manifest bytes)]."""
    registry = Registry(upstream)
    refs = [registry.push(make_adapter(seed=seed), task) for seed in seeds]
    return [(ref, registry.backend.get_manifest(task, ref.digest)) for ref in refs]


def _remote(url: str, timeout: float = 5.0) -> Registry:
    registry = Registry(url)
    registry.backend = OciStore(url, timeout=timeout)
    return registry


def _has_no_version(path) -> bool:
    return not path.exists() or Registry(path).tasks() == []


# --- 1. content asked for by digest is that content -----------------------------------------------


def test_a_digest_pinned_pull_or_copy_refuses_another_manifest(upstream, hostile, tmp_path):
    """The registry answers task@sha256:X with manifest Y, Y's true digest in Docker-Content-Digest."""
    (wanted, _), (other, other_bytes) = _push(upstream, "pinned", 1, 2)
    hostile.on("GET|HEAD", rf"/v2/team/pinned/manifests/{wanted.digest}",
               lambda e: Reply(200, {**MANIFEST, "Docker-Content-Digest": other.digest}, other_bytes))
    remote = Registry(hostile.url)
    for action in (lambda: remote.pull(f"pinned@{wanted.digest}", tmp_path / "out"),
                   lambda: remote.copy(f"pinned@{wanted.digest}", tmp_path / "local")):
        with pytest.raises(IntegrityError, match=f"manifest {wanted.digest} of team/pinned") as caught:
            action()
        assert other.digest in str(caught.value)
    assert not (tmp_path / "out").exists() and _has_no_version(tmp_path / "local")
    assert any(wanted.digest in e.path for e in hostile.seen)  # the lie was told
    assert remote.load(f"pinned@{other.digest}").tensors == make_adapter(seed=2).tensors  # the truth still works


@pytest.mark.parametrize("header", ["v1's digest", "v2's digest", None])
def test_a_version_tag_must_hold_that_version(upstream, hostile, tmp_path, header):
    """`task@v1` answered with v2's manifest: a lying header, the true one, or none; never v2's adapter."""
    (v1, _), (v2, v2_bytes) = _push(upstream, "moved", 3, 4)
    digest = {"v1's digest": v1.digest, "v2's digest": v2.digest, None: None}[header]
    headers = {**MANIFEST, **({"Docker-Content-Digest": digest} if digest else {})}
    hostile.on("GET|HEAD", r"/v2/team/moved/manifests/v1", lambda e: Reply(200, headers, v2_bytes))
    with pytest.raises(IntegrityError, match="manifest v1 of .*team/moved") as caught:
        Registry(hostile.url).pull("moved@v1", tmp_path / "out")
    assert v2.digest in str(caught.value) and not (tmp_path / "out").exists()


# --- 2. answers are read up to a cap ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_600_mb_manifest_is_not_read(upstream, hostile, tmp_path, declared):
    _push(upstream, "huge", 5)
    headers = {**MANIFEST, **({"Content-Length": str(OVERSIZE)} if declared else {})}
    hostile.on("GET", r"/v2/team/huge/manifests/.*", lambda e: Reply(200, headers, endless(OVERSIZE)))
    with pytest.raises(RemoteError, match=f"manifest v1 of team/huge: .*{oci_client.MAX_MANIFEST_BYTES}"):
        Registry(hostile.url).pull("huge@v1", tmp_path / "out")
    assert hostile.sent_bytes < SENT_BOUND and not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_blob_longer_than_its_descriptor_is_cut_off(upstream, hostile, tmp_path):
    ((ref, _),) = _push(upstream, "long", 6)
    tensor = Registry(upstream).manifest(ref).tensors[0]
    data = Registry(upstream).backend.get_blob("long", tensor.digest)
    hostile.on("GET", rf"/v2/team/long/blobs/{tensor.digest}",
               lambda e: Reply(200, {}, itertools.chain([data], endless(OVERSIZE))))
    with pytest.raises(IntegrityError, match=f"blob {tensor.digest} of team/long: .*more than {tensor.size} bytes"):
        Registry(hostile.url).copy("long@v1", tmp_path / "local")
    assert hostile.sent_bytes < SENT_BOUND and _has_no_version(tmp_path / "local")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("answer", ["endless body", "Link to itself", "Link to ever new pages"])
def test_a_tag_list_that_never_ends_is_refused(hostile, monkeypatch, answer):
    monkeypatch.setattr(oci_client, "MAX_LIST_PAGES", 20)
    pages = itertools.count()

    def tags(exchange):
        if answer == "endless body":
            return Reply(200, JSON, itertools.chain([b'{"tags":["'], endless(OVERSIZE, b"x" * MB)))
        query = "" if answer == "Link to itself" else f"&last=t{next(pages)}"
        return Reply(200, {**JSON, "Link": f'</v2/team/pages/tags/list?n=1000{query}>; rel="next"'},
                     b'{"name":"team/pages","tags":[]}')

    hostile.on("GET", r"/v2/team/pages/tags/list", tags)
    with pytest.raises(RemoteError, match="tag list of .*team/pages: "):
        Registry(hostile.url).versions("pages")
    assert hostile.sent_bytes < SENT_BOUND and len(hostile.seen) <= 20


# --- 3. credentials go to the registry's origin only ----------------------------------------------------


def test_a_link_to_another_origin_is_refused_before_any_request(upstream, hostile, elsewhere, credentials):
    _push(upstream, "linked", 7)

    def tags(exchange):
        reply = hostile.forward(exchange)
        reply.headers["Link"] = f'<{elsewhere.origin}/v2/team/linked/tags/list?last=v1>; rel="next"'
        return reply

    hostile.on("GET", r"/v2/team/linked/tags/list", tags)
    with pytest.raises(RemoteError, match=f"tag list of .*team/linked: .*{elsewhere.origin}"):
        Registry(hostile.url).versions("linked")
    assert elsewhere.seen == [] and hostile.authorizations == [credentials]  # credentials were in play


def test_an_upload_location_on_another_origin_is_refused(upstream, hostile, elsewhere, credentials):
    hostile.on("POST", r"/v2/team/located/blobs/uploads/",
               lambda e: Reply(202, {"Location": f"{elsewhere.origin}/upload/1"}))
    with pytest.raises(RemoteError, match=f"upload of blob sha256:[0-9a-f]{{64}} to team/located: .*{elsewhere.port}"):
        Registry(hostile.url).push(make_adapter(seed=8), "located")
    assert elsewhere.seen == [] and Registry(upstream).versions("located") == []
    assert credentials in hostile.authorizations


def test_a_redirect_elsewhere_is_followed_without_credentials(upstream, hostile, elsewhere, credentials, tmp_path):
    """Registries send blob downloads to a CDN: followed, but the Authorization header stays home."""
    ((ref, _),) = _push(upstream, "redirected", 9)
    registry = Registry(upstream)
    blobs = {digest: registry.backend.get_blob("redirected", digest) for digest, _ in registry.manifest(ref).blobs()}
    hostile.on("GET", r"/v2/team/redirected/blobs/.*",
               lambda e: Reply(307, {"Location": f"{elsewhere.origin}/cdn/{e.path.rsplit('/', 1)[1]}"}))
    elsewhere.on("GET", r"/cdn/.*", lambda e: Reply(200, {}, blobs[e.path.rsplit("/", 1)[1]]))
    assert Registry(hostile.url).pull("redirected@v1", tmp_path / "out").is_dir()
    assert {e.path for e in elsewhere.seen} == {f"/cdn/{digest}" for digest in blobs}
    assert set(elsewhere.authorizations) == {None} and credentials in hostile.authorizations


@pytest.mark.parametrize("realm_on", ["another origin over http", "the registry's own origin"])
def test_the_token_realm_gets_credentials_only_over_https_or_from_the_registry(
        upstream, hostile, elsewhere, credentials, realm_on):
    _push(upstream, "guarded", 10)
    token_service = elsewhere if realm_on.startswith("another") else hostile
    token_service.on("GET", r"/token", lambda e: Reply(200, JSON, b'{"token": "T0K"}'))
    challenge = f'Bearer realm="{token_service.origin}/token",service="reg",scope="repository:team/guarded:pull"'
    hostile.on(".*", r"/v2/.*", lambda e: None if e.headers.get("authorization") == "Bearer T0K" else
               Reply(401, {"WWW-Authenticate": challenge}))
    assert Registry(hostile.url).versions("guarded") == [1]
    token_requests = [e.headers.get("authorization") for e in token_service.seen if e.path.startswith("/token")]
    assert token_requests == [None if token_service is elsewhere else credentials]
    assert "Bearer T0K" in hostile.authorizations


def test_a_challenge_from_another_origin_is_not_answered(monkeypatch):
    """A redirect target that asks for a token gets no token request, so no credentials reach its realm."""
    monkeypatch.delenv("ADAPTERHUB_OCI_TOKEN", raising=False)
    monkeypatch.delenv("ADAPTERHUB_OCI_PASSWORD", raising=False)
    monkeypatch.setenv("ADAPTERHUB_OCI_USERNAME", "alice")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("Authorization")))
        if request.url.host == "registry.example":
            return httpx.Response(307, headers={"Location": "https://cdn.example/blob"})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://cdn.example/token"'})

    store = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler))
    with pytest.raises(RemoteError, match="blob sha256:0{64} of ns/sql: .*HTTP 401"):
        store.get_blob("sql", "sha256:" + "0" * 64, 1)
    assert seen == [("registry.example", "Basic YWxpY2U6"), ("cdn.example", None)]


# --- 4. no unverified byte is uploaded -------------------------------------------------------------------


def test_a_corrupt_local_blob_is_never_uploaded(hostile, tmp_path):
    local = Registry(tmp_path / "store")
    ref = local.push(make_adapter(seed=11), "mended")
    tensor = local.manifest(ref).tensors[0]
    path = tmp_path / "store" / "blobs" / "sha256" / tensor.digest.hex
    path.chmod(0o644)
    path.write_bytes(encode(b"\0" * tensor.size, 4))  # a well-formed blob file with other bytes
    with pytest.raises(IntegrityError, match=f"blob {tensor.digest}"):
        local.copy("mended@v1", hostile.url)
    assert not [e for e in hostile.seen if e.method in ("PUT", "PATCH") and tensor.digest in e.path]
    assert Registry(hostile.url).versions("mended") == []


def test_an_upload_is_hashed_before_it_leaves():
    """Whatever the source (a backend that does not verify, a bug), OciStore.put_blob sends no wrong byte."""
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.method)
        return httpx.Response(404 if request.method == "HEAD" else 202, headers={"Location": "/upload"})

    store, digest = OciStore("oci://registry.example/ns", transport=httpx.MockTransport(handler)), Digest.of(b"right")
    with pytest.raises(IntegrityError, match=f"blob {digest} for oci://registry.example/ns/sql"):
        send_blobs(store, "sql", [(digest, 5, 1)], lambda d: b"wrong")
    assert requests == ["HEAD"]


# --- stalls end in a RemoteError ------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["no answer", "a trickle"])
def test_a_stalling_registry_times_out(upstream, hostile, tmp_path, how):
    _push(upstream, "stalled", 12)
    rule = hostile.hang if how == "no answer" else (lambda e: Reply(200, MANIFEST, trickle(b"{" * 4096, 0.05)))
    hostile.on("GET", r"/v2/team/stalled/manifests/.*", rule)
    started = time.monotonic()
    with pytest.raises(RemoteError, match="manifest v1 of team/stalled: .*(within 1 s|slower than)"):
        _remote(hostile.url, timeout=1.0).pull("stalled@v1", tmp_path / "out")
    assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()


def test_the_default_timeouts_are_finite():
    timeout = OciStore("oci://registry.example/ns").client.http.timeout
    assert all(0 < seconds <= 60 for seconds in (timeout.connect, timeout.read, timeout.write, timeout.pool))


# --- bad input: locations ---------------------------------------------------------------------------------

BAD_LOCATIONS = [
    ("oci://", RemoteError, "'oci://'"),
    ("oci:///team", RemoteError, "'oci:///team'"),
    ("oci://host:notaport/team", RemoteError, "notaport"),
    ("oci://host:99999/team", RemoteError, "99999"),
    ("oci://host:0/team", RemoteError, "port 0"),
    ("oci://ho st/team", RemoteError, "'ho st' is not a host"),
    ("oci://[zz]/team", RemoteError, "oci://[zz]/team"),
    ("oci://-host/team", RemoteError, "'-host' is not a host"),
    ("oci://alice:s3cret@host/team", RemoteError, "holds credentials"),
    ("oci://host/team?tag=v1", RemoteError, "query"),
    ("oci://host/team#v1", RemoteError, "fragment"),
    ("https://host/team", RemoteError, "not an OCI location"),
    ("oci://host/Team", InvalidNameError, "component 'Team'"),
    ("oci://host/a//b", InvalidNameError, "component ''"),
    ("oci://host/../team", InvalidNameError, "component '..'"),
    ("oci://host/a b", InvalidNameError, "component 'a b'"),
    ("oci://host/te\x00am", InvalidNameError, "namespace component"),
    ("oci://host/" + "/".join(["abcdefghij"] * 20), InvalidNameError, "219 characters"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("location, error, names", BAD_LOCATIONS, ids=[repr(c[0])[:40] for c in BAD_LOCATIONS])
def test_a_bad_location_is_one_clear_error(location, error, names):
    with pytest.raises(error) as caught:
        OciStore(location)
    message = str(caught.value)
    assert names in message and "\n" not in message and "s3cret" not in message


# --- bad input: answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """corpus@v1 on the real registry: what the cases bend."""

    manifest: dict
    tensor: str  # digest of the first tensor blob
    tensor_bytes: bytes


@pytest.fixture(scope="module")
def seeded(upstream) -> Seeded:
    ((ref, data),) = _push(upstream, "corpus", 13)
    tensor = Registry(upstream).manifest(ref).tensors[0].digest
    return Seeded(json.loads(data), tensor, Registry(upstream).backend.get_blob("corpus", tensor))


def _answer(status: int, body: bytes = b"", headers: dict | None = None):
    return lambda s, proxy: lambda e: Reply(status, headers or {}, body)


def _bent(change: Callable[[dict], None]):
    """A manifest answer: corpus@v1's manifest after `change`, with its true digest."""
    def rule(s: Seeded, proxy):
        manifest = copy.deepcopy(s.manifest)
        change(manifest)
        data = canonical_json(manifest)
        return lambda e: Reply(200, {**MANIFEST, "Docker-Content-Digest": Digest.of(data)}, data)
    return rule


def _blob(bend: Callable[[bytes], bytes]):
    return lambda s, proxy: lambda e: Reply(200, {}, bend(s.tensor_bytes))


def _token_answer(body: bytes):
    """The tag list asks for a token at the proxy's /token, which answers `body`."""
    def rule(s: Seeded, proxy):
        proxy.on("GET", r"/token", lambda e: Reply(200, JSON, body))
        return lambda e: Reply(401, {"WWW-Authenticate": f'Bearer realm="{proxy.origin}/token",service="reg"'})
    return rule


TAGS, MANIFESTS, CATALOG = r"/v2/team/corpus/tags/list", r"/v2/team/corpus/manifests/.*", r"/v2/_catalog"
TENSOR = "TENSOR"  # stands for the path of corpus@v1's first tensor blob
UPLOADS, PUSHED_MANIFESTS = r"/v2/team/[^/]+/blobs/uploads/.*", r"/v2/team/[^/]+/manifests/.*"
HTML = b"<html>\n<body><h1>502 Bad Gateway</h1></body>\n</html>\n"
DENIED = b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'


def _layer(key: str, value):
    def change(manifest: dict) -> None:
        manifest["layers"][0][key] = value
    return change


def _one_blob_two_sizes(manifest: dict) -> None:
    """Point a layer of another size at the first layer's blob: one digest, two sizes."""
    first = manifest["layers"][0]
    other = next(layer for layer in manifest["layers"] if layer["size"] != first["size"])
    other["digest"] = first["digest"]


# (case id, operation, method, path, answer, error, what the message must name)
ANSWERS = [
    ("tags 401", "ls", "GET", TAGS, _answer(401, DENIED, JSON), RemoteError, "tag list of"),
    ("tags 403", "ls", "GET", TAGS, _answer(403, DENIED, JSON), RemoteError, "DENIED"),
    ("tags 500 html", "ls", "GET", TAGS, _answer(500, HTML, {"Content-Type": "text/html"}), RemoteError, "502 Bad"),
    ("tags not json", "ls", "GET", TAGS, _answer(200, b"tags: [v1", JSON), RemoteError, "tag list of"),
    ("tags html 200", "ls", "GET", TAGS, _answer(200, HTML, {"Content-Type": "text/html"}), RemoteError, "not JSON"),
    ("tags a json array", "ls", "GET", TAGS, _answer(200, b'["v1"]', JSON), RemoteError, "'tags' list"),
    ("tags not strings", "ls", "GET", TAGS, _answer(200, b'{"tags":[1,{}]}', JSON), RemoteError, "'tags' list"),
    ("tag digest header malformed", "ls", "HEAD", MANIFESTS,
     _answer(200, b"", {"Docker-Content-Digest": "md5:abc"}), RemoteError, "of team/corpus: the registry sent"),
    ("catalog not json", "tasks", "GET", CATALOG, _answer(200, b"\x00\xff", JSON), RemoteError, "repository catalog"),
    ("token realm not http", "ls", "GET", TAGS,
     _answer(401, b"", {"WWW-Authenticate": 'Bearer realm="file:///etc/passwd"'}), RemoteError, "file:///etc/passwd"),
    ("token answer garbage", "ls", "GET", TAGS, _token_answer(b"<html>"), RemoteError, "token from"),
    ("token answer without token", "ls", "GET", TAGS, _token_answer(b'{"tok": 1}'), RemoteError, "no 'token'"),
    ("manifest 404", "pull", "GET", MANIFESTS, _answer(404), RefNotFoundError, "corpus@v1"),
    ("manifest 403", "pull", "GET", MANIFESTS, _answer(403, DENIED, JSON), RemoteError, "manifest v1 of team/corpus"),
    ("manifest 500 multi-line", "pull", "GET", MANIFESTS, _answer(500, b"line 1\nline 2\x1b[31m"), RemoteError,
     "manifest v1 of team/corpus"),
    ("manifest html 200", "pull", "GET", MANIFESTS, _answer(200, HTML, {"Content-Type": "text/html"}),
     RemoteError, "'text/html'"),
    ("manifest of docker media type", "pull", "GET", MANIFESTS,
     _answer(200, b"{}", {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}),
     RemoteError, "manifest v1 of team/corpus"),
    ("manifest not json", "pull", "GET", MANIFESTS, _answer(200, b"{layers:", MANIFEST), IntegrityError,
     "manifest v1 of"),
    ("manifest a json array", "copy", "GET", MANIFESTS, _answer(200, b"[]", MANIFEST), IntegrityError,
     "manifest v1 of"),
    ("manifest without layers", "pull", "GET", MANIFESTS, _bent(lambda m: m.pop("layers")), IntegrityError,
     "'layers'"),
    ("manifest without config", "copy", "GET", MANIFESTS, _bent(lambda m: m.pop("config")), IntegrityError,
     "'config'"),
    ("layer without annotations", "pull", "GET", MANIFESTS, _bent(lambda m: m["layers"][0].pop("annotations")),
     IntegrityError, "manifest v1 of"),
    ("layer listed twice", "pull", "GET", MANIFESTS, _bent(lambda m: m["layers"].append(m["layers"][0])),
     IntegrityError, "manifest v1 of"),
    ("blob listed with two sizes", "copy", "GET", MANIFESTS, _bent(_one_blob_two_sizes), IntegrityError,
     "declares blob"),
    ("layer with negative size", "pull", "GET", MANIFESTS, _bent(_layer("size", -1)), IntegrityError, "manifest v1 of"),
    ("layer with a bad digest", "pull", "GET", MANIFESTS, _bent(_layer("digest", "sha256:xyz")), IntegrityError,
     "manifest v1 of"),
    ("manifest of another task", "pull", "GET", MANIFESTS,
     _bent(lambda m: m["annotations"].update({"org.adapterhub.task": "other"})), IntegrityError, "'other'"),
    ("blob 404", "pull", "GET", TENSOR, _answer(404), RefNotFoundError, "TENSOR"),
    ("blob 500", "copy", "GET", TENSOR, _answer(500), RemoteError, "TENSOR"),
    ("blob truncated", "pull", "GET", TENSOR, _blob(lambda b: b[:-1]), IntegrityError, "TENSOR"),
    ("blob with other bytes", "copy", "GET", TENSOR, _blob(lambda b: bytes(len(b))), IntegrityError, "TENSOR"),
    ("blob html 200", "pull", "GET", TENSOR, _blob(lambda b: HTML * 100), IntegrityError, "TENSOR"),
    ("blob redirect loop", "pull", "GET", TENSOR,
     lambda s, proxy: lambda e: Reply(302, {"Location": e.path}), RemoteError, "redirects"),
    ("upload without Location", "push", "POST", UPLOADS, _answer(202), RemoteError, "without the Location"),
    ("upload refused", "push", "PUT", UPLOADS,
     _answer(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match"}]}', JSON),
     RemoteError, "DIGEST_INVALID"),
    ("manifest put answered 200", "push", "PUT", PUSHED_MANIFESTS, _answer(200), RemoteError, "manifest v1 of team/"),
]


def _operation(name: str, url: str, tmp_path, case: str):
    remote = _remote(url)
    return {
        "ls": lambda: remote.versions("corpus"),
        "tasks": lambda: remote.tasks(),
        "pull": lambda: remote.pull("corpus@v1", tmp_path / "out"),
        "copy": lambda: remote.copy("corpus@v1", tmp_path / "local"),
        "push": lambda: remote.push(make_adapter(seed=14), "push-" + "-".join(case.lower().split())),
    }[name]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case, operation, method, path, answer, error, names", ANSWERS,
                         ids=[c[0] for c in ANSWERS])
def test_a_bad_answer_is_one_clear_error(seeded, hostile, tmp_path, case, operation, method, path, answer, error,
                                         names):
    path = path.replace(TENSOR, rf"/v2/team/corpus/blobs/{seeded.tensor}")
    hostile.on(method, path, answer(seeded, hostile))
    with pytest.raises(AdapterHubError) as caught:
        _operation(operation, hostile.url, tmp_path, case)()
    message = str(caught.value)
    assert type(caught.value) is error, message
    assert names.replace(TENSOR, seeded.tensor) in message and "\n" not in message and "\x1b" not in message
    assert not (tmp_path / "out").exists() and _has_no_version(tmp_path / "local")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["manifest 500 multi-line", "blob with other bytes", "tags not json"])
def test_the_cli_prints_a_bad_answer_as_one_line(seeded, hostile, tmp_path, case):
    _, operation, method, path, answer, error, _ = next(c for c in ANSWERS if c[0] == case)
    hostile.on(method, path.replace(TENSOR, rf"/v2/team/corpus/blobs/{seeded.tensor}"), answer(seeded, hostile))
    args = ["ls", "corpus"] if operation == "ls" else ["pull", "corpus@v1", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--registry", hostile.url])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output  # progress bars use \r
    assert f"Error: {error.__name__}: " in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
