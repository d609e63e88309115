"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1: just the calls `HfApi.create_repo` and
`HfApi.upload_folder` make when every file is small enough to go inline ("regular" upload mode, base64 in
the commit body). It keeps each commit's files, so a test can read back exactly what was uploaded."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class HubStub:
    url: str = ""
    repos: set[str] = field(default_factory=set)
    commits: list[dict] = field(default_factory=list)  # {"repo", "revision", "summary", "files": {path: bytes}}
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    validated: list[str] = field(default_factory=list)  # README.md texts sent to /api/validate-yaml
    authorizations: list[str | None] = field(default_factory=list)


def _handler(stub: HubStub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            return None

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            stub.requests.append(("POST", self.path))
            stub.authorizations.append(self.headers.get("Authorization"))
            body = self._body()
            if self.path == "/api/repos/create":
                request = json.loads(body)
                repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                stub.repos.add(repo)
                return self._reply(200, {"url": f"{stub.url}/{repo}", "name": repo, "id": repo})
            if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before committing it
                stub.validated.append(json.loads(body)["content"])
                return self._reply(200, {"errors": [], "warnings": []})
            found = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
            if found is None or found.group(1) not in stub.repos:
                return self._reply(404, {"error": f"Repository not found: {self.path}"})
            repo, kind, revision = found.group(1), found.group(2), found.group(3)
            if revision != "main":  # the stub's repos have one branch
                return self._reply(404, {"error": f"Invalid rev id: {revision}"})
            if kind == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            stub.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "files": files})
            oid = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
            return self._reply(200, {"commitUrl": f"{stub.url}/{repo}/commit/{oid}", "commitOid": oid,
                                     "pullRequestUrl": None})

        def do_GET(self) -> None:  # noqa: N802
            stub.requests.append(("GET", self.path))
            return self._reply(404, {"error": f"not implemented by the stub: {self.path}"})

    return Handler


@contextlib.contextmanager
def hub_stub():
    """A running stub; yields its `HubStub` (url: the endpoint to give HF_ENDPOINT)."""
    stub = HubStub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
