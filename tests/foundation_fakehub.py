"""A tiny stand-in for the Hugging Face Hub, served on 127.0.0.1 for the asset tests.

It implements only what ``huggingface_hub`` uses to list and download model files:

* ``GET  /api/models/{owner}/{name}[/revision/{rev}]`` -> model info with ``siblings`` and ``sha``;
* ``HEAD /{owner}/{name}/resolve/{rev}/{file}`` -> ``ETag``, ``X-Repo-Commit``, ``Content-Length``;
* ``GET  /{owner}/{name}/resolve/{rev}/{file}`` -> the bytes (``Range`` honoured);
* unknown repo / file -> 404 with ``X-Error-Code: RepoNotFound`` / ``EntryNotFound`` as the Hub does.

Every request is recorded in ``hub.requests`` so tests can assert that nothing was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.commit = hashlib.sha1(b"fake-commit").hexdigest()
        self.requests: list[tuple[str, str]] = []
        #: while cleared, file GETs wait (an endless download); set on exit
        self.gate = threading.Event()
        self.gate.set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[str]:
        """Paths of file GETs (not HEADs, not API calls)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    # ---------------------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, 404, body, {"X-Error-Code": code, "Content-Type": "application/json"}, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = m.group(1)
            if repo not in self.repos:
                return self._error(h, "RepoNotFound", head)
            info = {
                "id": repo,
                "sha": self.commit,
                "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])],
            }
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._send(h, 400, b"bad path", {}, head)
        repo, _rev, filename = m.groups()
        if repo not in self.repos:
            return self._error(h, "RepoNotFound", head)
        data = self.repos[repo].get(filename)
        if data is None:
            return self._error(h, "EntryNotFound", head)
        headers = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": self.commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, body = 200, data
        if not head:
            self.gate.wait(120)
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body) if not head else len(data))
        self._send(h, status, body, headers, head)
