"""OCI distribution-spec remote: ``oci://host:port/namespace`` (one OCI repository per task).

Mapping (docs/store-format.md "OCI"): task T → repository ``<namespace>/T``; version N → tag ``vN``;
``latest`` and user tags → tags; the manifest, config and tensor blobs are pushed byte for byte, so
digests are the same on both sides. Push: HEAD each blob, upload only missing ones (POST then one PUT,
or PATCH chunks then PUT for large blobs), manifest PUT last. https, except http for loopback hosts.

**What is trusted.** Nothing the registry volunteers. A manifest or blob asked for by digest must hash to
that digest (`IntegrityError` naming the object and both digests); a ``Docker-Content-Digest`` header is
never used to fetch content. A manifest asked for by tag (``vN``, ``latest``, a user tag) is named by the
hash of the bytes that arrived (a header that disagrees is an `IntegrityError`), and must be a manifest of
the task; ``vN`` must hold version N. Listings (`versions`, `tags`) take digests from HEAD headers, but
those digests only ever name what to fetch next, and that fetch is verified. Every upload is re-hashed
here first, whatever the source, so no unverified byte leaves this process. The HTTP side (bounded
answers, timeouts, where credentials go) is `oci_client.py`.

**Artifacts adapterhub did not push.** A manifest that is not adapterhub's per-tensor format is read
through oras.py: an ORAS file artifact holding ``adapter_config.json`` and ``adapter_model.safetensors``
(``oras push``, ``copy --oras-files``) is translated into the per-tensor manifest of its adapter; its
version number is its own annotation, else N of a ``vN`` tag naming it. The translation and its blobs are
kept for the last `TRANSLATIONS` artifacts read, so a pull fetches each file once. Anything else is an
`IntegrityError` naming its artifactType and media types.

Remote limits: no atomic version allocation (a registry has no compare-and-swap: use one pusher per task
on a remote), and removing a tag alone is not part of distribution 2.x.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import threading
from collections import OrderedDict
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

import httpx

from adapterhub.errors import IntegrityError, InvalidNameError, RefNotFoundError, RemoteError
from adapterhub.registry import oras
from adapterhub.registry.digest import Digest, is_digest, verify
from adapterhub.registry.manifest import CONFIG_MEDIA_TYPE, Manifest
from adapterhub.registry.oci_client import MAX_BLOB_BYTES, TIMEOUT, OciClient, one_line
from adapterhub.registry.refs import LATEST, RefSpec, ResolvedRef, check_tag, check_task

_HOST = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")  # RFC 1123 names
_VERSION = re.compile(r"v([1-9][0-9]*)")
TRANSLATIONS = 8  # ORAS file artifacts whose translation (manifest and blobs) a store keeps in memory


def _any_tag(tag: str) -> str:
    return check_tag(tag, user=False)


def _is_name(check, value: str) -> bool:
    try:
        check(value)
        return True
    except InvalidNameError:
        return False


def parse_location(location: str) -> tuple[str, str]:
    """``oci://host[:port]/namespace`` → (registry base URL, namespace); says which part is wrong."""
    usage = "expected oci://host[:port]/namespace, e.g. oci://registry.example.com:5000/team"
    try:
        parts = urlsplit(location)
        port = parts.port
    except (ValueError, TypeError) as error:
        raise RemoteError(f"{one_line(str(location))!r} is not an OCI location ({error}); {usage}") from None
    if parts.scheme != "oci" or not parts.hostname:
        raise RemoteError(f"{one_line(location)!r} is not an OCI location; {usage}")
    if parts.username is not None or parts.password is not None:  # never echoed: it may hold a password
        raise RemoteError(f"the OCI location for {parts.hostname} holds credentials; a URL ends up in logs and "
                          "messages, so set ADAPTERHUB_OCI_TOKEN or ADAPTERHUB_OCI_USERNAME/PASSWORD instead")
    if parts.query or parts.fragment or port == 0:
        raise RemoteError(f"{one_line(location)!r} has a query, a fragment or port 0; {usage}")
    host = parts.hostname
    if not (_is_ip(host) or (len(host) <= 253 and _HOST.fullmatch(host))):
        raise RemoteError(f"{one_line(location)!r}: {one_line(host)!r} is not a host name or IP address; {usage}")
    scheme = "http" if host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback) else "https"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return f"{scheme}://{netloc}", _namespace(location, parts.path)


def _namespace(location: str, path: str) -> str:
    """The repository prefix: "/" or "" for none, else components with the task grammar (OCI repository
    name components), leaving room for a 64-character task in distribution's 255-character names."""
    namespace = path[1:] if path.startswith("/") else path
    namespace = namespace[:-1] if namespace.endswith("/") else namespace
    for component in namespace.split("/") if namespace else []:
        if not _is_name(check_task, component):
            raise InvalidNameError(f"{one_line(location)!r}: namespace component {one_line(component)!r} is not "
                                   "allowed; use lowercase letters, digits and single '.', '_' or '-' between them, "
                                   "e.g. oci://host:5000/team")
    if len(namespace) > 255 - 65:
        raise InvalidNameError(f"{one_line(location)!r}: the namespace has {len(namespace)} characters; at most "
                               "190 leave room for a task name in a 255-character OCI repository name")
    return namespace


def _tag_version(reference: str) -> int | None:
    found = _VERSION.fullmatch(reference)
    return int(found.group(1)) if found else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class OciStore:
    """The backend `Registry` uses for ``oci://`` locations; satisfies `backend.Backend` (contracts there).

    Not a `MaintainableBackend`: the registry server verifies digests and collects its own garbage.
    """

    def __init__(self, location: str, transport: httpx.BaseTransport | None = None, timeout: float = TIMEOUT):
        """`timeout`: seconds to connect and for each read or write (module docstring, "Bounded answers")."""
        base, self.namespace = parse_location(location)
        self.location = location.rstrip("/")
        self.client = OciClient(base, transport, timeout)
        # blob sizes declared by the manifests read here: the read cap of a blob fetched without its size
        self._sizes: dict[str, int] = {}
        # remote digest of an ORAS file artifact -> (translated manifest bytes, Manifest, {digest: blob})
        self._translated: OrderedDict[str, tuple[bytes, Manifest, dict[Digest, bytes]]] = OrderedDict()
        self._translated_lock = threading.Lock()  # blobs are read on several threads (transfer.py)

    def repo(self, task: str) -> str:
        return f"{self.namespace}/{task}" if self.namespace else task

    def session(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # nothing to hold: no adapterhub gc runs against a remote

    def has_blob(self, task: str, digest: str) -> bool:
        return self.client.has_blob(self.repo(task), digest)

    def put_blob(self, task: str, digest: str, raw: bytes, width: int) -> bool:
        # the registry re-hashes an upload too; hashing here first means no unverified byte leaves this
        # process, whichever backend the bytes were read from
        verify(raw, digest, f"blob {digest} for {self.location}/{task}")
        self.client.put_blob(self.repo(task), digest, raw)
        return True

    def get_blob(self, task: str, digest: str, size: int | None = None) -> bytes:
        """Read at most `size` bytes (else the size a manifest read here declares), then verified."""
        translated = self._translated_blob(digest)
        if translated is not None:
            return translated
        data = self.client.get_blob(self.repo(task), digest, self._sizes.get(digest) if size is None else size)
        if size is not None and len(data) != size:  # the bytes hash right: the descriptor is what is wrong
            raise IntegrityError(f"blob {digest} from {self.location}/{task} has {len(data)} bytes but its "
                                 f"descriptor says {size}; the manifest naming it is inconsistent, re-push it")
        return data

    def get_manifest(self, task: str, digest: str) -> bytes:
        found = self._manifest(task, digest)
        if found is None:
            raise RefNotFoundError(f"manifest {digest} is missing from {self.location}/{task}")
        return found[1]

    def _stored(self, task: str, digest: str) -> bytes:
        """The manifest bytes the registry stores as `digest` (never a translation): what a tag must name."""
        found = self.client.get_manifest(self.repo(task), digest)
        if found is None:
            raise RefNotFoundError(f"manifest {digest} is missing from {self.location}/{task}")
        return found[1]

    def _manifest(self, task: str, reference: str) -> tuple[Digest, bytes, Manifest] | None:
        """(digest, bytes, parsed) of the manifest `reference` (a digest or a tag) of `task`, or None."""
        found = self.client.get_manifest(self.repo(task), reference)
        if found is None:
            return None
        digest, data = found
        what = f"manifest {reference} of {self.location}/{task}"
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None  # Manifest.from_json names the JSON error
        if parsed is None or oras.is_adapterhub(parsed):
            return digest, data, self._checked(task, data, what)
        return digest, *self._translate(task, digest, parsed, reference, what)

    def _translate(self, task: str, digest: Digest, d: dict, reference: str, what: str) -> tuple[bytes, Manifest]:
        """(translated bytes, Manifest) of the ORAS file artifact `d` (module docstring); its PEFT files are
        fetched once, verified, and kept with the translation."""
        with self._translated_lock:
            if digest in self._translated:
                self._translated.move_to_end(digest)
                return self._translated[digest][:2]
        files = oras.peft_files(d, what)  # anything else: IntegrityError naming its media types
        if any(size > MAX_BLOB_BYTES for _, size in files.values()):
            raise IntegrityError(f"{what} declares a PEFT file over {MAX_BLOB_BYTES} bytes; refused unread")
        version = oras.version_of(d) or _tag_version(reference)
        if version is None:
            version = next((n for n, found in sorted(self.versions(task).items()) if found == digest), None)
        if version is None:
            raise IntegrityError(f"{what} is an ORAS file artifact that no vN tag names, so it is no version of "
                                 f"{task}; tag it as one (oras tag <ref> v1, or push it as :v1)")
        data = {name: self.client.get_blob(self.repo(task), file_digest, size)
                for name, (file_digest, size) in files.items()}
        config, config_data = d.get("config") if isinstance(d.get("config"), dict) else {}, None
        if config.get("mediaType") == CONFIG_MEDIA_TYPE and isinstance(config.get("digest"), str) \
                and is_digest(config["digest"]) and type(config.get("size")) is int \
                and 0 <= config["size"] <= MAX_BLOB_BYTES:  # adapterhub's own config blob: the base identity
            config_data = self.client.get_blob(self.repo(task), Digest(config["digest"]), config["size"])
        manifest, blobs = oras.translate(d, data, task, version, what, config_data)
        translated = (manifest.to_json(), manifest, blobs)
        with self._translated_lock:
            self._translated[digest] = translated
            while len(self._translated) > TRANSLATIONS:
                self._translated.popitem(last=False)
        return translated[:2]

    def _translated_blob(self, digest: str) -> bytes | None:
        with self._translated_lock:
            return next((blobs[digest] for _, _, blobs in self._translated.values() if digest in blobs), None)

    def _checked(self, task: str, data: bytes, what: str) -> Manifest:
        """`data` parsed as a manifest of `task` (manifest.py checks every field) with one size per blob.

        Records the blob sizes: they cap what reading each blob may allocate.
        """
        manifest = Manifest.from_json(data, what, task=task)
        sizes: dict[str, int] = {}
        for digest, size in manifest.blobs():
            if size > MAX_BLOB_BYTES or sizes.setdefault(digest, size) != size:
                raise IntegrityError(f"{what} declares blob {digest} with {size} bytes (elsewhere {sizes[digest]}, "
                                     f"at most {MAX_BLOB_BYTES}); the manifest is corrupt, re-push the adapter")
        self._sizes.update(sizes)
        return manifest

    def tasks(self) -> list[str]:
        prefix = f"{self.namespace}/" if self.namespace else ""
        names = self.client.list_paged("/v2/_catalog?n=1000", "repositories",
                                       f"repository catalog of {self.client.base}")
        return sorted({n[len(prefix):] for n in names
                       if n.startswith(prefix) and _is_name(check_task, n[len(prefix):])})

    def _tags(self, task: str) -> dict[str, Digest]:
        repo = self.repo(task)
        tags = self.client.list_paged(f"/v2/{repo}/tags/list?n=1000", "tags", f"tag list of {self.location}/{task}")
        # a name outside the tag grammar is no adapterhub ref, and would not be safe in a URL path
        found = {tag: self.client.manifest_digest(repo, tag) for tag in tags if _is_name(_any_tag, tag)}
        return {tag: digest for tag, digest in found.items() if digest is not None}

    def versions(self, task: str) -> dict[int, Digest]:
        return {int(m.group(1)): d for t, d in self._tags(task).items() if (m := _VERSION.fullmatch(t))}

    def tags(self, task: str) -> dict[str, Digest]:
        return {t: d for t, d in self._tags(task).items() if t != LATEST and not _VERSION.fullmatch(t)}

    def lookup(self, spec: RefSpec) -> ResolvedRef | None:
        """One GET of the manifest (by tag ``vN``, tag or digest): its hash is the digest, its annotations the
        version; a ``vN`` whose manifest is another version is an IntegrityError."""
        reference = f"v{spec.value}" if spec.kind == "version" else spec.value
        found = self._manifest(spec.task, reference)
        if found is None:
            return None
        digest, _, manifest = found
        if spec.kind == "version" and manifest.version != int(spec.value):
            raise IntegrityError(f"manifest v{spec.value} of {self.location}/{spec.task} is {digest}, the manifest "
                                 f"of version {manifest.version}; tag v{spec.value} was moved, re-copy {spec} from "
                                 "a good registry")
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
                    self._tag(repo, tags, self._stored(task, versions[latest]))
                    return ResolvedRef(task, latest, versions[latest]), False
            manifest = manifest.at(max(versions, default=0) + 1, now_rfc3339()).to_json()
        return self._put_version(task, Manifest.from_json(manifest, f"manifest for {task}").version, manifest,
                                 tags, versions)

    def publish_files(self, task: str, version: int, data: bytes, tags: tuple[str, ...] = ()) -> tuple[ResolvedRef, bool]:
        """Like `publish` of exact bytes, for the ORAS file variant of version `version` (oras.files_manifest):
        its files must be stored first. Reading it back translates it to that version's manifest."""
        return self._put_version(task, version, data, tags, self.versions(task))

    def _put_version(self, task: str, version: int, data: bytes, tags: tuple[str, ...],
                     versions: dict[int, Digest]) -> tuple[ResolvedRef, bool]:
        """PUT `data` as tag vN (refused if vN names other bytes), then `latest` when N is the newest, then `tags`."""
        repo, digest = self.repo(task), Digest.of(data)
        if versions.get(version, digest) != digest:
            raise RemoteError(f"{task}@v{version} already exists at {self.location} with manifest "
                              f"{versions[version]}, not {digest}; versions are immutable")
        self.client.put_manifest(repo, f"v{version}", data)
        newest = version >= max(versions, default=0)
        self._tag(repo, tags + ((LATEST,) if newest else ()), data)
        return ResolvedRef(task, version, digest), version not in versions

    def _tag(self, repo: str, tags, data: bytes) -> None:
        for tag in tags:
            self.client.put_manifest(repo, tag, data)

    def set_tag(self, task: str, tag: str, digest: str) -> None:
        self.client.put_manifest(self.repo(task), tag, self._stored(task, digest))

    def delete_tag(self, task: str, tag: str) -> None:
        raise RemoteError(f"removing only the tag {task}:{tag} is not supported by OCI distribution 2.x "
                          f"registries; move it with 'adapterhub tag' or remove its version instead")

    def delete_version(self, task: str, version: int) -> None:
        """Deleting the manifest drops every tag on it; `latest` is then re-pointed at the newest version."""
        self.client.delete_manifest(self.repo(task), self.versions(task)[version])
        versions = self.versions(task)
        if versions:
            self._tag(self.repo(task), (LATEST,), self._stored(task, versions[max(versions)]))
