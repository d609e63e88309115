"""OCI distribution-spec remote: ``oci://host:port/namespace`` (one OCI repository per task).

Mapping (docs/store-format.md "OCI"): task T → repository ``<namespace>/T``; version N → tag ``vN``;
``latest`` and user tags → tags; the manifest, config and tensor blobs are pushed byte for byte, so
digests are the same on both sides. Push: HEAD each blob, upload only missing ones (POST then one PUT,
or PATCH chunks then PUT for large blobs), manifest PUT last. Pull: every blob and manifest re-hashed.

Authentication from the environment: ``ADAPTERHUB_OCI_TOKEN`` (a bearer token used as is), or
``ADAPTERHUB_OCI_USERNAME`` + ``ADAPTERHUB_OCI_PASSWORD`` (HTTP basic, or exchanged for a bearer token at
the realm named by a ``WWW-Authenticate: Bearer`` challenge). https, except http for loopback hosts.
Remote limits: no atomic version allocation (a registry has no compare-and-swap: use one pusher per task
on a remote), and removing a tag alone is not part of distribution 2.x.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
from collections import Counter
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

import httpx

from adapterhub.errors import RefNotFoundError, RemoteError
from adapterhub.registry.digest import Digest, verify
from adapterhub.registry.manifest import MANIFEST_MEDIA_TYPE, Manifest
from adapterhub.registry.refs import LATEST, RefSpec, ResolvedRef, check_task

CHUNK = 8 * 1024 * 1024  # blobs above this go up in PATCH chunks of this size
_VERSION = re.compile(r"v([1-9][0-9]*)")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class EnvAuth(httpx.Auth):
    """Bearer token / basic credentials from the environment; answers a Bearer challenge once per request."""

    def __init__(self, env=os.environ):
        self.token = env.get("ADAPTERHUB_OCI_TOKEN")
        user, password = env.get("ADAPTERHUB_OCI_USERNAME"), env.get("ADAPTERHUB_OCI_PASSWORD")
        self.basic = basic_auth_header(user, password or "") if user else None

    def auth_flow(self, request):
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        elif self.basic:
            request.headers["Authorization"] = self.basic
        response = yield request
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer"):
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", None)
        if not realm:
            return
        token_request = httpx.Request("GET", realm, params=params)
        if self.basic:
            token_request.headers["Authorization"] = self.basic
        token_response = yield token_request
        token_response.read()
        if token_response.status_code != 200:
            return
        body = token_response.json()
        self.token = body.get("token") or body.get("access_token")
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def basic_auth_header(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic (RFC 7617 §2): base64 of "user:password" in UTF-8, the
    charset RFC 7617 §2.1 names and httpx.BasicAuth uses, so the header is the one httpx would send."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


class OciClient:
    """The handful of distribution-spec endpoints adapterhub needs; counts requests per (method, endpoint)."""

    def __init__(self, base_url: str, transport: httpx.BaseTransport | None = None):
        self.base = base_url.rstrip("/")
        self.http = httpx.Client(auth=EnvAuth(), transport=transport, timeout=60.0, follow_redirects=True)
        self.counts: Counter = Counter()
        self._count_lock = threading.Lock()  # blobs move on several threads (transfer.py)

    def request(self, method: str, url: str, ok=(200,), **kwargs) -> httpx.Response:
        url = url if url.startswith("http") else self.base + url
        kind = next((k for k in ("uploads", "blobs", "manifests", "tags", "_catalog") if f"/{k}" in url), "other")
        with self._count_lock:
            self.counts[method, kind] += 1
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError as error:
            raise RemoteError(f"cannot reach {self.base} ({type(error).__name__}: {error}); is the registry "
                              "running and the URL right?") from None
        if response.status_code not in ok:
            raise RemoteError(f"{method} {url} → HTTP {response.status_code}: {_oci_error(response)}"
                              + ("; set ADAPTERHUB_OCI_TOKEN or ADAPTERHUB_OCI_USERNAME/PASSWORD"
                                 if response.status_code in (401, 403) else ""))
        return response

    def has_blob(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404)).status_code == 200

    def get_blob(self, repo: str, digest: str) -> bytes:
        response = self.request("GET", f"/v2/{repo}/blobs/{digest}", ok=(200, 404))
        if response.status_code == 404:
            raise RefNotFoundError(f"blob {digest} is missing from {self.base}/{repo}")
        verify(response.content, digest, f"blob {digest} from {self.base}/{repo}")
        return response.content

    def put_blob(self, repo: str, digest: str, data: bytes) -> None:
        location = self.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,)).headers["Location"]
        start = 0
        while len(data) - start > CHUNK:  # chunked upload: PATCH ranges, then PUT with the digest
            piece = data[start:start + CHUNK]
            location = self.request("PATCH", self._abs(location), ok=(202,), content=piece, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(piece) - 1}"}).headers["Location"]
            start += len(piece)
        separator = "&" if "?" in location else "?"
        self.request("PUT", self._abs(location) + f"{separator}digest={digest}", ok=(201,), content=data[start:],
                     headers={"Content-Type": "application/octet-stream"})

    def _abs(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    def manifest_digest(self, repo: str, reference: str) -> Digest | None:
        response = self.request("HEAD", f"/v2/{repo}/manifests/{reference}", ok=(200, 404),
                                headers={"Accept": MANIFEST_MEDIA_TYPE})
        return Digest(response.headers["Docker-Content-Digest"]) if response.status_code == 200 else None

    def get_manifest(self, repo: str, digest: str) -> bytes:
        response = self.request("GET", f"/v2/{repo}/manifests/{digest}", ok=(200, 404),
                                headers={"Accept": MANIFEST_MEDIA_TYPE})
        if response.status_code == 404:
            raise RefNotFoundError(f"manifest {digest} is missing from {self.base}/{repo}")
        verify(response.content, digest, f"manifest {digest} from {self.base}/{repo}")
        return response.content

    def put_manifest(self, repo: str, tag: str, data: bytes) -> None:
        self.request("PUT", f"/v2/{repo}/manifests/{tag}", ok=(201,), content=data,
                     headers={"Content-Type": MANIFEST_MEDIA_TYPE})

    def delete_manifest(self, repo: str, digest: str) -> None:
        self.request("DELETE", f"/v2/{repo}/manifests/{digest}", ok=(202,))

    def list_paged(self, path: str, key: str) -> list[str]:
        """tags/list and _catalog, following `Link: <...>; rel="next"` pages."""
        items, url = [], path
        while url:
            response = self.request("GET", url, ok=(200, 404))
            if response.status_code == 404:
                return items
            items += response.json().get(key) or []
            link = re.match(r'<([^>]+)>;\s*rel="next"', response.headers.get("Link", ""))
            url = link.group(1) if link else None
        return items


def _oci_error(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or response.text[:200]
    except ValueError:
        return response.text[:200] or response.reason_phrase


class OciStore:
    """The backend `Registry` uses for ``oci://`` locations; satisfies `backend.Backend` (contracts there).

    Not a `MaintainableBackend`: the registry server verifies digests and collects its own garbage.
    """

    def __init__(self, location: str, transport: httpx.BaseTransport | None = None):
        parts = urlsplit(location)
        if parts.scheme != "oci" or not parts.hostname:
            raise RemoteError(f"{location!r} is not an OCI location; expected oci://host[:port]/namespace")
        scheme = "http" if parts.hostname in _LOOPBACK or parts.hostname.startswith("127.") else "https"
        self.location = location.rstrip("/")
        self.namespace = parts.path.strip("/")
        for component in filter(None, self.namespace.split("/")):
            check_task(component)  # OCI repository-name components share the task grammar
        self.client = OciClient(f"{scheme}://{parts.netloc}", transport)

    def repo(self, task: str) -> str:
        return f"{self.namespace}/{task}" if self.namespace else task

    def session(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # nothing to hold: no adapterhub gc runs against a remote

    def has_blob(self, task: str, digest: str) -> bool:
        return self.client.has_blob(self.repo(task), digest)

    def put_blob(self, task: str, digest: str, raw: bytes, width: int) -> bool:
        self.client.put_blob(self.repo(task), digest, raw)
        return True

    def get_blob(self, task: str, digest: str) -> bytes:
        return self.client.get_blob(self.repo(task), digest)

    def get_manifest(self, task: str, digest: str) -> bytes:
        return self.client.get_manifest(self.repo(task), digest)

    def tasks(self) -> list[str]:
        prefix = f"{self.namespace}/" if self.namespace else ""
        names = self.client.list_paged("/v2/_catalog?n=1000", "repositories")
        return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):])

    def _tags(self, task: str) -> dict[str, Digest]:
        tags = self.client.list_paged(f"/v2/{self.repo(task)}/tags/list?n=1000", "tags")
        found = {tag: self.client.manifest_digest(self.repo(task), tag) for tag in tags}
        return {tag: digest for tag, digest in found.items() if digest is not None}

    def versions(self, task: str) -> dict[int, Digest]:
        return {int(m.group(1)): d for t, d in self._tags(task).items() if (m := _VERSION.fullmatch(t))}

    def tags(self, task: str) -> dict[str, Digest]:
        return {t: d for t, d in self._tags(task).items() if t != LATEST and not _VERSION.fullmatch(t)}

    def lookup(self, spec: RefSpec) -> ResolvedRef | None:
        """One HEAD for a version; a tag or digest also GETs the manifest to learn its version number."""
        reference = f"v{spec.value}" if spec.kind == "version" else spec.value
        digest = self.client.manifest_digest(self.repo(spec.task), reference)
        if digest is None:
            return None
        if spec.kind == "version":
            return ResolvedRef(spec.task, int(spec.value), digest)
        manifest = Manifest.from_json(self.get_manifest(spec.task, digest), f"{spec} manifest")
        return ResolvedRef(spec.task, manifest.version, digest)

    def publish(self, task: str, manifest: Manifest | bytes, tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, bool]:
        """PUT the manifest as tag vN, then `latest` (when N is the newest) and the user tags."""
        from adapterhub.registry.local import now_rfc3339
        repo, versions = self.repo(task), self.versions(task)
        if isinstance(manifest, Manifest):
            if versions:
                latest = max(versions)
                previous = Manifest.from_json(self.get_manifest(task, versions[latest]), f"{task}@v{latest}")
                if previous.content_key() == manifest.content_key():
                    self._tag(repo, tags, self.get_manifest(task, versions[latest]))
                    return ResolvedRef(task, latest, versions[latest]), False
            manifest = manifest.at(max(versions, default=0) + 1, now_rfc3339()).to_json()
        version, digest = Manifest.from_json(manifest, f"manifest for {task}").version, Digest.of(manifest)
        if versions.get(version, digest) != digest:
            raise RemoteError(f"{task}@v{version} already exists at {self.location} with manifest "
                              f"{versions[version]}, not {digest}; versions are immutable")
        self.client.put_manifest(repo, f"v{version}", manifest)
        newest = version >= max(versions, default=0)
        self._tag(repo, tags + ((LATEST,) if newest else ()), manifest)
        return ResolvedRef(task, version, digest), version not in versions

    def _tag(self, repo: str, tags, data: bytes) -> None:
        for tag in tags:
            self.client.put_manifest(repo, tag, data)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        self.client.put_manifest(self.repo(task), tag, self.get_manifest(task, digest))

    def delete_tag(self, task: str, tag: str) -> None:
        raise RemoteError(f"removing only the tag {task}:{tag} is not supported by OCI distribution 2.x "
                          f"registries; move it with 'adapterhub tag' or remove its version instead")

    def delete_version(self, task: str, version: int) -> None:
        """Deleting the manifest drops every tag on it; `latest` is then re-pointed at the newest version."""
        self.client.delete_manifest(self.repo(task), self.versions(task)[version])
        versions = self.versions(task)
        if versions:
            self._tag(self.repo(task), (LATEST,), self.get_manifest(task, versions[max(versions)]))
