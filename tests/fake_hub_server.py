"""A small in-process stand-in for the Hugging Face Hub HTTP API, for tests.

It answers what ``huggingface_hub`` sends for the calls :mod:`pipeline.hub` makes:

* ``GET  /api/{models,datasets}/<id>[/revision/<rev>]``   repo info (sha, siblings)
* ``GET  /api/{models,datasets}/<id>/tree/<rev>[/<path>]``  file listing (``recursive`` ignored: always flat)
* ``HEAD|GET /[datasets/]<id>/resolve/<rev>/<path>``       file metadata and content
* ``POST /api/repos/create``                               create a repository (409 if it exists)
* ``POST /api/validate-yaml``                              README metadata check (always fine)
* ``POST /api/{models,datasets}/<id>/preupload/<rev>``     every file is "regular" (inline base64)
* ``POST /api/{models,datasets}/<id>/commit/<rev>``        NDJSON commit
* ``GET  /api/whoami-v2``

Writes need ``Authorization: Bearer <token>`` with a token in :attr:`FakeHub.tokens`. Failures can be
injected per route with :meth:`FakeHub.fail` (e.g. ``hub.fail("commit", 500)``). Every request is
recorded in :attr:`FakeHub.requests` as ``(method, path)``.

Start it with ``FakeHub()`` (127.0.0.1, a free port) and point clients at :attr:`FakeHub.endpoint`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

_TYPE_PREFIX = {"models": "model", "datasets": "dataset"}


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class FakeRepo:
    def __init__(self, repo_id: str, repo_type: str, private: bool = False) -> None:
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.private = private
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []
        self.branches: dict[str, str] = {}
        self._commit("initial commit")

    def _commit(self, message: str) -> str:
        digest = hashlib.sha1()
        digest.update(message.encode())
        digest.update(str(len(self.commits)).encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        sha = digest.hexdigest()
        self.commits.append(sha)
        self.branches["main"] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """See the module docstring."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_test_token",), user: str = "tester") -> None:
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()
        handler = _make_handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ------------------------------------------------------------------ setup helpers

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, repo_type: str = "dataset",
                 private: bool = False) -> FakeRepo:
        repo = FakeRepo(repo_id, repo_type, private)
        repo.files.update(files or {})
        repo._commit("add files")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, *, repo_type: str = "dataset", prefix: str = "") -> FakeRepo:
        files = {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self.add_repo(repo_id, files, repo_type=repo_type)
        repo.files.update(files)
        repo._commit("add folder")
        return repo

    def repo(self, repo_id: str, repo_type: str = "dataset") -> FakeRepo | None:
        return self.repos.get((repo_type, repo_id))

    def fail(self, route: str, status: int) -> None:
        """Answer the next requests to ``route`` (info, tree, resolve, create, preupload, commit) with ``status``."""
        self.failures[route] = status

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
            pass

        # ---------------------------------------------------------- responses

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json({"error": message}, status, headers)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            return auth.startswith("Bearer ") and auth[len("Bearer "):] in hub.tokens

        def _injected(self, route: str) -> bool:
            status = hub.failures.get(route)
            if status is None:
                return False
            self._error(status, f"injected failure on {route}")
            return True

        # ---------------------------------------------------------- routing

        def _route(self) -> None:
            hub.requests.append((self.command, self.path))
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            body = self._body() if self.command == "POST" else b""
            with hub._lock:
                if parts[:2] == ["api", "whoami-v2"]:
                    return self._whoami()
                if parts[:3] == ["api", "repos", "create"]:
                    return self._create(body)
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._json({"errors": [], "warnings": []})
                if len(parts) >= 4 and parts[0] == "api" and parts[1] in _TYPE_PREFIX:
                    return self._api_repo(_TYPE_PREFIX[parts[1]], parts[2:], query, body)
                if "resolve" in parts:
                    return self._resolve(parts)
            return self._error(404, f"no route for {self.command} {url.path}")

        do_GET = _route
        do_HEAD = _route
        do_POST = _route

        def _whoami(self) -> None:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._json({"type": "user", "name": hub.user, "fullname": "Test User", "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

        def _find(self, repo_type: str, repo_id: str) -> FakeRepo | None:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and not self._authorized()):
                self._error(401 if repo is None or not self._authorized() else 404,
                            "Repository not found", "RepoNotFound")
                return None
            return repo

        def _create(self, body: bytes) -> None:
            if self._injected("create"):
                return
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            payload = json.loads(body or b"{}")
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.endpoint}/{prefix}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                return self._json({"error": "You already created this repo", "url": url}, 409)
            private = payload.get("private") or payload.get("visibility") == "private"
            repo = FakeRepo(repo_id, repo_type, bool(private))
            hub.repos[(repo_type, repo_id)] = repo
            return self._json({"url": url, "name": repo_id, "id": repo_id})

        def _api_repo(self, repo_type: str, rest: list[str], query: dict, body: bytes) -> None:
            repo_id = "/".join(rest[:2])
            action = rest[2] if len(rest) > 2 else "revision"
            revision = rest[3] if len(rest) > 3 else "main"
            if action == "revision" and self._injected("info"):
                return
            if action in ("tree", "preupload", "commit") and self._injected(action):
                return
            repo = self._find(repo_type, repo_id)
            if repo is None:
                return
            if action in ("preupload", "commit"):
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                if self.command != "POST":
                    return self._error(405, "method not allowed")
                return self._preupload(repo, body) if action == "preupload" else self._commit(repo, body)
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if action == "revision":
                return self._json({
                    "id": repo_id, "sha": sha, "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                })
            if action == "tree":
                sub = "/".join(rest[4:]).strip("/")
                entries = [
                    {"type": "file", "oid": _sha(data), "size": len(data), "path": path}
                    for path, data in sorted(repo.files.items())
                    if not sub or path.startswith(sub + "/")
                ]
                return self._json(entries)
            return self._error(404, f"no route for {action}")

        def _preupload(self, repo: FakeRepo, body: bytes) -> None:
            payload = json.loads(body or b"{}")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": _sha(repo.files[f["path"]]) if f["path"] in repo.files else None}
                     for f in payload.get("files", [])]
            return self._json({"files": files, "commitOid": repo.branches["main"]})

        def _commit(self, repo: FakeRepo, body: bytes) -> None:
            message = "commit"
            staged: dict[str, bytes] = {}
            deleted: list[str] = []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item.get("key"), item.get("value", {})
                if key == "header":
                    message = value.get("summary") or message
                elif key == "file":
                    content = value.get("content", "")
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    staged[value["path"]] = data
                elif key in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
                else:
                    return self._error(400, f"unsupported commit operation {key!r} (the fake hub is regular-only)")
            repo.files.update(staged)
            for path in deleted:
                repo.files = {p: d for p, d in repo.files.items() if p != path and not p.startswith(path + "/")}
            sha = repo._commit(message)
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            return self._json({"commitUrl": f"{hub.endpoint}/{prefix}{repo.repo_id}/commit/{sha}",
                               "commitOid": sha, "success": True, "pullRequestUrl": None})

        def _resolve(self, parts: list[str]) -> None:
            if self._injected("resolve"):
                return
            i = parts.index("resolve")
            head = parts[:i]
            repo_type = "dataset" if head and head[0] == "datasets" else "model"
            repo_id = "/".join(head[1:] if repo_type == "dataset" else head)
            repo = self._find(repo_type, repo_id)
            if repo is None:
                return
            revision = parts[i + 1] if len(parts) > i + 1 else "main"
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            path = "/".join(parts[i + 2:])
            if path not in repo.files:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            data = repo.files[path]
            return self._send(200, data, {
                "X-Repo-Commit": sha,
                "ETag": f'"{_sha(data)}"',
                "Content-Type": "application/octet-stream",
            })

    return Handler
