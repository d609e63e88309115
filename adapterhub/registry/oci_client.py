"""The HTTP client of the OCI remote: requests with bounded answers, timeouts, and credentials kept to
the registry's origin (registry/oci.py maps adapterhub's objects onto it).

**Bounded answers.** Bodies are streamed and reading stops at a cap: a blob at the size its manifest
declares (else `MAX_BLOB_BYTES`), a manifest at `MAX_MANIFEST_BYTES`, a whole tag list or catalog at
`MAX_LIST_BYTES` and `MAX_LIST_PAGES`, error and token bodies at `MAX_MESSAGE_BYTES`. Each socket
operation (connect, each read or write) times out after `timeout` seconds (`OciStore(timeout=...)`,
default `TIMEOUT`), and a body that trickles in slower than `MIN_RATE` on average after that grace is
abandoned: a hung or stalling registry ends in a `RemoteError`, never a hang.

**Where credentials go.** From the environment: ``ADAPTERHUB_OCI_TOKEN`` (a bearer token used as is), or
``ADAPTERHUB_OCI_USERNAME`` + ``ADAPTERHUB_OCI_PASSWORD`` (HTTP basic, or exchanged for a bearer token at
the realm of a ``WWW-Authenticate: Bearer`` challenge). The rules, after Go's http.Client (which docker and
oras use) and the token-auth spec:

- ``Authorization`` is sent only to the registry's origin (scheme, host and port of the location).
- A redirect is followed (at most `MAX_REDIRECTS`), without credentials once it leaves that origin:
  registries send blob downloads to a CDN or object store with a signed URL.
- An upload ``Location`` or a pagination ``Link`` on another origin is refused (`RemoteError`): the
  protocol has no use for one, and following it would let the registry aim our next request (an upload
  body included) anywhere.
- A Bearer challenge is answered only when it comes from the registry's origin. The token request goes to
  its realm (token auth puts it on another host, e.g. auth.docker.io), with the registry credentials only
  if the realm is https or on the registry's own origin; a plain-http realm elsewhere gets an anonymous
  token request (public pulls still work; a password never crosses the network in clear to a third party).
  A realm that is not an http(s) URL is refused.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from adapterhub.errors import IntegrityError, RefNotFoundError, RegistryError, RemoteError
from adapterhub.registry.digest import Digest, is_digest
from adapterhub.registry.manifest import MANIFEST_MEDIA_TYPE

CHUNK = 8 * 1024 * 1024  # blobs above this go up in PATCH chunks of this size
# distribution refuses to store a manifest above 4 MiB (registry/handlers/manifests.go, maxManifestBodySize),
# so a longer answer is not a manifest it holds
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_BLOB_BYTES = 4 * 1024 ** 3  # the largest blob a manifest may declare, and the cap where none declares one
MAX_LIST_BYTES = 16 * 1024 * 1024  # every page of one tags/list or _catalog listing together
MAX_LIST_PAGES = 1000  # pages of one listing, 1000 names each
MAX_MESSAGE_BYTES = 64 * 1024  # an error or token body: read for its message, never whole
MAX_REDIRECTS = 10  # Go's http.Client default, which docker and oras inherit
TIMEOUT = 30.0  # seconds to connect, and for each read or write of a request
MIN_RATE = 16 * 1024  # bytes/s a body must average, after TIMEOUT seconds of grace
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ACCEPT = {"Accept": MANIFEST_MEDIA_TYPE}


@dataclass(frozen=True)
class BodyLimit:
    """How many body bytes to read at most, why, and the error that reading more raises."""

    size: int
    reason: str
    error: type[RegistryError] = RemoteError


MANIFEST_LIMIT = BodyLimit(MAX_MANIFEST_BYTES, "the most a registry stores for a manifest")
MESSAGE_LIMIT = BodyLimit(MAX_MESSAGE_BYTES, "the most read of an error or token answer")


def _origin(url: httpx.URL | str) -> tuple[str, str, int]:
    """(scheme, host, port): where credentials may go (RFC 6454 §4)."""
    url = httpx.URL(url)
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def one_line(text: str | bytes, limit: int = 200) -> str:
    """Server-sent text fit for a message: printable, one line, short."""
    if isinstance(text, bytes):
        text = text[:4 * limit].decode("utf-8", errors="replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def read_body(response: httpx.Response, limit: BodyLimit, what: str, timeout: float, is_prefix: bool = False) -> bytes:
    """At most `limit.size` bytes of a streamed `response`; more raises `limit.error` naming `what` (with
    `is_prefix`, the first `limit.size` bytes are returned instead: a message needs no more).

    httpx's read timeout bounds only the wait for each packet, so a body that trickles in slower than
    MIN_RATE on average (after `timeout` seconds of grace) is abandoned too.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit.size and not is_prefix:
        raise limit.error(f"{what}: the registry announces {int(declared)} bytes, more than {limit.size} "
                          f"({limit.reason}); nothing was read")
    chunks, received, started = [], 0, time.monotonic()
    for chunk in response.iter_bytes():
        received += len(chunk)
        if received > limit.size and is_prefix:
            return b"".join(chunks) + chunk[:limit.size - received + len(chunk)]
        if received > limit.size:
            raise limit.error(f"{what}: the registry sent more than {limit.size} bytes ({limit.reason}); "
                              "reading stopped there")
        elapsed = time.monotonic() - started
        if elapsed > timeout + received / MIN_RATE:
            raise RemoteError(f"{what}: {received} bytes in {elapsed:.1f} s, slower than {MIN_RATE} B/s; the "
                              "registry is stalling or overloaded, retry later")
        chunks.append(chunk)
    return b"".join(chunks)


class EnvAuth:
    """Credentials from the environment: a bearer token, else HTTP basic, which a Bearer challenge exchanges
    for a token. `OciClient` decides where they may go (module docstring, "Where credentials go")."""

    def __init__(self, env=os.environ):
        self.token = env.get("ADAPTERHUB_OCI_TOKEN")
        user, password = env.get("ADAPTERHUB_OCI_USERNAME"), env.get("ADAPTERHUB_OCI_PASSWORD")
        self.basic = basic_auth_header(user, password or "") if user else None

    def header(self) -> str | None:
        return f"Bearer {self.token}" if self.token else self.basic

    def token_request(self, realm: str, params: dict[str, str], registry: tuple[str, str, int]) -> httpx.Request:
        """GET realm?service=…&scope=…, with basic credentials only to an https realm or the registry itself."""
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in _DEFAULT_PORTS or not url.host:
            raise RemoteError(f"the registry's token service realm {one_line(realm)!r} is not an http(s) URL; "
                              "the registry is misconfigured, or set ADAPTERHUB_OCI_TOKEN to skip the exchange")
        request = httpx.Request("GET", url, params=params)
        if self.basic and (url.scheme == "https" or _origin(url) == registry):
            request.headers["Authorization"] = self.basic
        return request

    def read_token(self, response: httpx.Response, realm: str, timeout: float) -> None:
        what = f"token from {one_line(realm)}"
        body = read_body(response, MESSAGE_LIMIT, what, timeout)
        if response.status_code != 200:
            raise RemoteError(f"{what}: HTTP {response.status_code}: {_oci_error(body, response)}; check "
                              "ADAPTERHUB_OCI_USERNAME / ADAPTERHUB_OCI_PASSWORD, or set ADAPTERHUB_OCI_TOKEN")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token.isascii() or not token.isprintable():
            raise RemoteError(f"{what}: the answer has no 'token' string ({one_line(body, 80)!r}); is the realm a "
                              "registry token service?")
        self.token = token


def basic_auth_header(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic (RFC 7617 §2): base64 of "user:password" in UTF-8, the
    charset RFC 7617 §2.1 names and httpx.BasicAuth uses, so the header is the one httpx would send."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


def _bearer_challenge(response: httpx.Response) -> tuple[str | None, dict[str, str]]:
    """(realm, other parameters) of a 401's ``WWW-Authenticate: Bearer`` challenge; (None, {}) otherwise."""
    challenge = response.headers.get("WWW-Authenticate", "")
    if response.status_code != 401 or not challenge.lower().startswith("bearer"):
        return None, {}
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    return params.pop("realm", None), params


class OciClient:
    """The handful of distribution-spec endpoints adapterhub needs; counts requests per (method, endpoint).

    Redirects and Bearer challenges are handled here, not by httpx's follow_redirects and Auth flows, which
    read every intermediate body (a redirect's, a 401's) whole, and send credentials to any URL they are
    given (module docstring, "Where credentials go").
    """

    def __init__(self, base_url: str, transport: httpx.BaseTransport | None = None, timeout: float = TIMEOUT):
        self.base = base_url.rstrip("/")
        self.origin = _origin(self.base)
        self.timeout = timeout
        self.auth = EnvAuth()
        # identity: a compressed answer could expand past a cap inside one chunk
        self.http = httpx.Client(transport=transport, timeout=timeout, follow_redirects=False,
                                 headers={"Accept-Encoding": "identity"})
        self.counts: Counter = Counter()
        self._count_lock = threading.Lock()  # blobs move on several threads (transfer.py)

    def url(self, target: str, what: str) -> httpx.URL:
        """`target` (a path, or a Location / Link the registry sent) made absolute; another origin is refused."""
        try:
            url = httpx.URL(self.base).join(target)
        except httpx.InvalidURL as error:
            raise RemoteError(f"{what}: the registry sent the URL {one_line(target)!r}, which is invalid "
                              f"({error})") from None
        if _origin(url) != self.origin:
            raise RemoteError(f"{what}: the registry sends us on to {one_line(str(url))}, another origin than "
                              f"{self.base}; adapterhub sends requests and credentials only to the registry "
                              "itself, so fix the registry's URL settings (e.g. its http.host)")
        return url

    def request(self, method: str, target: str, what: str, ok=(200,), limit: BodyLimit | None = None,
                **kwargs) -> tuple[httpx.Response, bytes]:
        """One call: the final response (closed) and at most `limit` bytes of its body (none without `limit`)."""
        url = self.url(target, what)
        kind = next((k for k in ("uploads", "blobs", "manifests", "tags", "_catalog") if f"/{k}" in url.path),
                    "other")
        with self._count_lock:
            self.counts[method, kind] += 1
        try:
            with contextlib.closing(self._send(self.http.build_request(method, url, **kwargs), what)) as response:
                if response.status_code not in ok:
                    raise RemoteError(self._refusal(response, what))
                return response, b"" if limit is None else read_body(response, limit, what, self.timeout)
        except httpx.TimeoutException as error:
            raise RemoteError(f"{what}: {method} {url} got no answer within {self.timeout:g} s "
                              f"({type(error).__name__}); the registry is hung or overloaded, retry later") from None
        except httpx.HTTPError as error:
            raise RemoteError(f"{what}: cannot reach {self.base} ({type(error).__name__}: {one_line(str(error))}); "
                              "is the registry running and the URL right?") from None

    def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send `request`, following redirects and answering one Bearer challenge; returns the open response."""
        is_challenged = False
        for _ in range(MAX_REDIRECTS + 2):
            request.headers.pop("Authorization", None)
            credentials = self.auth.header()
            if credentials and _origin(request.url) == self.origin:
                request.headers["Authorization"] = credentials
            response = self.http.send(request, stream=True)
            realm, params = _bearer_challenge(response)
            if realm is not None and not is_challenged and _origin(request.url) == self.origin:
                response.close()
                self._fetch_token(realm, params)
                is_challenged = True
                continue
            if response.next_request is None:
                return response
            response.close()  # a redirect's body is never read
            request = response.next_request
        raise RemoteError(f"{what}: more than {MAX_REDIRECTS} redirects, the last to {one_line(str(request.url))}; "
                          "the registry is misconfigured")

    def _fetch_token(self, realm: str, params: dict[str, str]) -> None:
        token_request = self.auth.token_request(realm, params, self.origin)
        with contextlib.closing(self.http.send(token_request, stream=True)) as response:
            self.auth.read_token(response, realm, self.timeout)

    def _refusal(self, response: httpx.Response, what: str) -> str:
        body = b""
        with contextlib.suppress(RegistryError, httpx.HTTPError):  # the status alone still makes a message
            body = read_body(response, MESSAGE_LIMIT, what, self.timeout, is_prefix=True)
        hint = ("; set ADAPTERHUB_OCI_TOKEN or ADAPTERHUB_OCI_USERNAME/PASSWORD"
                if response.status_code in (401, 403) else "")
        return (f"{what}: {response.request.method} {response.request.url} → HTTP {response.status_code}: "
                f"{_oci_error(body, response)}{hint}")

    def has_blob(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}", f"blob {digest} of {repo}",
                            ok=(200, 404))[0].status_code == 200

    def get_blob(self, repo: str, digest: str, size: int | None) -> bytes:
        """The blob, read up to `size` (its descriptor's; MAX_BLOB_BYTES if unknown), verified."""
        what = f"blob {digest} of {repo}"
        limit = BodyLimit(MAX_BLOB_BYTES, "MAX_BLOB_BYTES: no size known", IntegrityError) if size is None else \
            BodyLimit(size, "the size its manifest declares", IntegrityError)
        response, data = self.request("GET", f"/v2/{repo}/blobs/{digest}", what, ok=(200, 404), limit=limit)
        if response.status_code == 404:
            raise RefNotFoundError(f"blob {digest} is missing from {self.base}/{repo}; re-push or re-copy the "
                                   "version that names it")
        return _verified(data, digest, what)

    def put_blob(self, repo: str, digest: str, data: bytes) -> None:
        what = f"upload of blob {digest} to {repo}"
        response, _ = self.request("POST", f"/v2/{repo}/blobs/uploads/", what, ok=(202,))
        location, start = self._location(response, what), 0
        while len(data) - start > CHUNK:  # chunked upload: PATCH ranges, then PUT with the digest
            piece = data[start:start + CHUNK]
            response, _ = self.request("PATCH", location, what, ok=(202,), content=piece, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(piece) - 1}"})
            location, start = self._location(response, what), start + len(piece)
        separator = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{separator}digest={digest}", what, ok=(201,), content=data[start:],
                     headers={"Content-Type": "application/octet-stream"})

    def _location(self, response: httpx.Response, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RemoteError(f"{what}: the registry answered HTTP {response.status_code} without the Location "
                              "header that says where the upload goes on; it does not speak the OCI upload protocol")
        return str(self.url(location, what))

    def manifest_digest(self, repo: str, tag: str) -> Digest | None:
        """The digest the registry lists for `tag` (HEAD). Only used to name what to fetch next, which is verified."""
        what = f"manifest {tag} of {repo}"
        response, _ = self.request("HEAD", f"/v2/{repo}/manifests/{tag}", what, ok=(200, 404), headers=_ACCEPT)
        if response.status_code == 404:
            return None
        header = response.headers.get("Docker-Content-Digest")
        if header is None:  # optional in the distribution spec: hash the manifest instead
            found = self.get_manifest(repo, tag)
            return None if found is None else found[0]
        if not is_digest(header):
            raise RemoteError(f"{what}: the registry sent Docker-Content-Digest {one_line(header, 80)!r}, not "
                              "'sha256:<64 hex>'; it is broken, or the repository was not pushed by adapterhub")
        return Digest(header)

    def get_manifest(self, repo: str, reference: str) -> tuple[Digest, bytes] | None:
        """(digest, bytes) of the manifest `reference` (a digest or a tag), or None; the digest is the hash of
        what arrived, which must equal a digest `reference` and any Docker-Content-Digest header."""
        what = f"manifest {reference} of {repo}"
        response, data = self.request("GET", f"/v2/{repo}/manifests/{reference}", what, ok=(200, 404),
                                      limit=MANIFEST_LIMIT, headers=_ACCEPT)
        if response.status_code == 404:
            return None
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
        if media_type and media_type != MANIFEST_MEDIA_TYPE:
            raise RemoteError(f"{what}: the registry serves it as {one_line(media_type, 80)!r}, not as an OCI "
                              f"image manifest ({MANIFEST_MEDIA_TYPE}); {repo} holds something adapterhub did "
                              "not push")
        if is_digest(reference):
            return Digest(reference), _verified(data, reference, what)
        digest, header = Digest.of(data), response.headers.get("Docker-Content-Digest")
        if header is not None and header != digest:
            raise IntegrityError(f"{what}: the registry says it is {one_line(header, 80)} but its content hashes "
                                 f"to {digest}; nothing was used, the registry is corrupt or hostile")
        return digest, data

    def put_manifest(self, repo: str, tag: str, data: bytes) -> None:
        self.request("PUT", f"/v2/{repo}/manifests/{tag}", f"manifest {tag} of {repo}", ok=(201,), content=data,
                     headers={"Content-Type": MANIFEST_MEDIA_TYPE})

    def delete_manifest(self, repo: str, digest: str) -> None:
        self.request("DELETE", f"/v2/{repo}/manifests/{digest}", f"manifest {digest} of {repo}", ok=(202,))

    def list_paged(self, path: str, key: str, what: str) -> list[str]:
        """tags/list and _catalog, following `Link: <...>; rel="next"` pages within the listing limits."""
        items, url, seen, budget = [], path, set(), MAX_LIST_BYTES
        while url:
            url = str(self.url(url, what))
            if url in seen or len(seen) == MAX_LIST_PAGES:
                raise RemoteError(f"{what}: the registry's pages do not end (page {len(seen) + 1}, {url}); "
                                  f"adapterhub reads at most {MAX_LIST_PAGES} pages, each once")
            seen.add(url)
            response, body = self.request("GET", url, what, ok=(200, 404),
                                          limit=BodyLimit(budget, "MAX_LIST_BYTES for a whole listing"))
            if response.status_code == 404:
                return items
            budget -= len(body)
            items += _list_page(body, key, what)
            link = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', response.headers.get("Link", ""))
            url = link.group(1) if link else None
        return items


def _verified(data: bytes, digest: str, what: str) -> bytes:
    actual = Digest.of(data)
    if actual != digest:
        raise IntegrityError(f"{what}: the registry sent content that hashes to {actual}, not the {digest} asked "
                             "for; nothing was used: the registry's copy is corrupt, or the registry is hostile")
    return data


def _list_page(body: bytes, key: str, what: str) -> list[str]:
    """The `key` list of one tags/list or _catalog page (null: none, as distribution sends for no tags)."""
    try:
        page = json.loads(body)
    except ValueError as error:
        raise RemoteError(f"{what}: the answer is not JSON ({one_line(str(error), 80)}): "
                          f"{one_line(body, 80)!r}; is this an OCI registry?") from None
    values = page.get(key) if isinstance(page, dict) else 0
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RemoteError(f"{what}: expected a JSON object with a {key!r} list of strings, got "
                          f"{one_line(body, 80)!r}; is this an OCI registry?")
    return values


def _oci_error(body: bytes, response: httpx.Response) -> str:
    """The distribution-spec error codes and messages of a refusal, else the start of its body, on one line."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError, TypeError):
        text = ""
    return one_line(text or body) or response.reason_phrase or "no details"
