"""A local stand-in for the Hugging Face Hub: the slice of its HTTP API that ``huggingface_hub`` uses to create a
model repo, upload files (regular and LFS) in commits, and resolve and download them.

The real ``huggingface_hub`` client talks to it over a real socket: point ``HF_ENDPOINT`` at ``FakeHub.url`` before
``huggingface_hub`` is imported (``FakeHub.client_env`` builds that environment for a subprocess). Only stdlib:
``ThreadingHTTPServer`` in a daemon thread, bound to 127.0.0.1 on an ephemeral port; blobs live in a directory the
caller owns, with limits on the size of a request and of the whole store.

Routes (model repos ``namespace/name`` only):

    POST      /api/repos/create                              create a repo (initial commit with .gitattributes)
    GET       /api/models/{repo}[/revision/{rev}]            repo info (sha, siblings)
    POST      /api/validate-yaml                             README front matter check
    POST      /api/models/{repo}/preupload/{rev}             upload mode per file ("lfs" for LFS patterns)
    POST      /{repo}.git/info/lfs/objects/batch             LFS batch API, "basic" transfer
    PUT       /lfs-upload/{repo}/{sha256}                    LFS object upload (the batch's upload href)
    POST      /lfs-verify/{repo}                             LFS verify action
    POST      /api/models/{repo}/commit/{rev}                NDJSON commit: file (base64), lfsFile, deletedFile/Folder
    HEAD/GET  /{repo}/resolve/{rev}/{path}                   file metadata (X-Repo-Commit, ETag, X-Linked-*) and bytes

Anything else answers 404 and is recorded in ``FakeHub.unhandled`` so a test can assert that the client needed
nothing more. Write routes need ``Authorization: Bearer <token>``; the LFS PUT (a presigned URL on the real Hub)
instead accepts only objects announced by an authenticated batch call.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import json
import os
import re
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from typing_extensions import Self

DEFAULT_TOKEN = "hf_fake_hub_token"
DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.npy", "*.npz")
MiB = 1024 * 1024

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"
_SEGMENT = r"(?P<rev>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/{_SEGMENT})?", "repo_info"),
        ("POST", rf"/api/models/{_REPO}/preupload/{_SEGMENT}", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/{_SEGMENT}", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
        ("POST", rf"/lfs-verify/{_REPO}", "lfs_verify"),
        ("HEAD", rf"/{_REPO}/resolve/{_SEGMENT}/(?P<path>.+)", "resolve"),
        ("GET", rf"/{_REPO}/resolve/{_SEGMENT}/(?P<path>.+)", "resolve"),
    ]
]


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class FileEntry:
    """A file in a commit: its blob (by sha256), size, git blob oid and whether it is stored through LFS."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, FileEntry]
    date: str


@dataclass
class Repo:
    repo_id: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> Commit:
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _validate_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class FakeHub:
    """A local Hub server. Use as a context manager, or call ``start()`` and ``stop()``.

    Args:
        root: directory for the blob store (the caller owns and removes it).
        token: the only token write routes accept.
        lfs_patterns: files the server asks the client to upload through LFS, like the Hub's default .gitattributes.
        max_request_bytes: largest request body accepted (413 beyond).
        max_storage_bytes: largest total of stored blobs (413 beyond).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        token: str = DEFAULT_TOKEN,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        max_request_bytes: int = 64 * MiB,
        max_storage_bytes: int = 256 * MiB,
    ):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lfs_patterns = lfs_patterns
        self.max_request_bytes = max_request_bytes
        self.max_storage_bytes = max_storage_bytes
        self.repos: dict[str, Repo] = {}
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=10_000)
        self.unhandled: deque[tuple[str, str]] = deque(maxlen=1_000)
        self._blob_sizes: dict[str, int] = {}
        self._announced_lfs: dict[str, int] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FakeHub is already running")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def client_env(self, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a process whose ``huggingface_hub`` must talk to this server and nothing else.

        ``huggingface_hub`` reads these at import time, so pass them to a fresh process. Offline switches, other
        endpoints, tokens and proxies from ``base`` are dropped; Xet is disabled so LFS files take the LFS batch
        API (what the client does when ``hf_xet`` is not installed); the cache is under ``hf_home``.
        """
        env = {
            key: value
            for key, value in (os.environ if base is None else base).items()
            if not key.startswith(("HF_", "HUGGINGFACE_"))
            and key not in ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")
            and key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        }
        home = Path(hf_home)
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN=self.token,
            HF_HOME=str(home),
            HF_HUB_CACHE=str(home / "hub"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
            NO_PROXY="127.0.0.1,localhost",
        )
        return env

    # ---- inspection for tests --------------------------------------------------------------------------------

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self._lock:
            entry = self._repo(repo_id).resolve(revision).files.get(path)
            if entry is None:
                raise KeyError(f"{path} not in {repo_id}@{revision}")
            return self._blob_path(entry.sha256).read_bytes()

    def list_files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        with self._lock:
            return dict(self._repo(repo_id).resolve(revision).files)

    def history(self, repo_id: str) -> list[Commit]:
        """Commits of ``main``, oldest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return [repo.commits[oid] for oid in repo.history]

    # ---- storage ---------------------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def _store_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        with self._lock:
            if sha256 not in self._blob_sizes:
                if sum(self._blob_sizes.values()) + len(content) > self.max_storage_bytes:
                    raise HubError(413, f"Fake hub storage limit of {self.max_storage_bytes} bytes reached")
                self._blob_path(sha256).write_bytes(content)
                self._blob_sizes[sha256] = len(content)
        return sha256

    def _is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in self.lfs_patterns)

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, FileEntry]) -> Commit:
        tree = {path: [entry.sha256, entry.lfs] for path, entry in sorted(files.items())}
        digest = json.dumps([repo.repo_id, parent, message, tree, len(repo.history)]).encode()
        commit = Commit(hashlib.sha1(digest).hexdigest(), parent, message, files, _now())
        repo.commits[commit.oid] = commit
        repo.branches["main"] = commit.oid
        repo.history.append(commit.oid)
        return commit

    # ---- routes ----------------------------------------------------------------------------------------------

    def create_repo(self, request: _Request) -> tuple[int, Any]:
        request.require_token()
        payload = request.json()
        name, organization = payload.get("name"), payload.get("organization")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "The fake hub only hosts model repos")
        if not isinstance(name, str) or not isinstance(organization, str):
            raise HubError(400, "The fake hub needs a repo id of the form namespace/name")
        repo_id = f"{organization}/{name}"
        if not re.fullmatch(f"{_NAME}/{_NAME}", repo_id):
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", headers={"X-Repo-Url": self.url})
            repo = Repo(repo_id, _now())
            self.repos[repo_id] = repo
            attributes = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in self.lfs_patterns)
            content = attributes.encode()
            entry = FileEntry(self._store_blob(content), len(content), git_blob_oid(content), lfs=False)
            self._new_commit(repo, None, "initial commit", {".gitattributes": entry})
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, request: _Request) -> tuple[int, Any]:
        content = request.json().get("content", "")
        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, re.DOTALL)
        if match is not None:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                return 400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}
            if metadata is not None and not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "Front matter must be a mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def repo_info(self, request: _Request, repo: str, rev: str | None = None) -> tuple[int, Any]:
        with self._lock:
            record = self._repo(repo)
            commit = record.resolve(unquote(rev) if rev else "main")
            with_blobs = request.query.get("blobs", [""])[0].lower() in ("1", "true")
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=entry.size, blobId=entry.git_oid)
                    if entry.lfs:
                        sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 134}
                siblings.append(sibling)
            namespace = repo.split("/")[0]
            return 200, {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": namespace,
                "sha": commit.oid,
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
                "createdAt": record.created_at,
                "lastModified": commit.date,
            }

    def preupload(self, request: _Request, repo: str, rev: str) -> tuple[int, Any]:
        request.require_token()
        payload = request.json()
        with self._lock:
            commit = self._repo(repo).resolve(unquote(rev))
            answers = []
            for item in payload.get("files", []):
                path = _validate_path(item["path"])
                lfs = self._is_lfs(path) and int(item["size"]) > 0
                answer: dict[str, Any] = {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                }
                existing = commit.files.get(path)
                if existing is not None and existing.lfs == lfs:
                    answer["oid"] = existing.etag
                answers.append(answer)
        return 200, {"files": answers, "commitOid": commit.oid}

    def lfs_batch(self, request: _Request, repo: str) -> tuple[int, Any]:
        request.require_token()
        payload = request.json()
        self._repo(repo)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "The fake hub supports LFS uploads with the basic transfer only")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid"}})
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self._lock:
                if oid not in self._blob_sizes:
                    self._announced_lfs[oid] = size
                    answer["actions"] = {
                        "upload": {"href": f"{self.url}/lfs-upload/{repo}/{oid}", "header": {}},
                        "verify": {"href": f"{self.url}/lfs-verify/{repo}", "header": {}},
                    }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, request: _Request, repo: str, oid: str) -> tuple[int, Any]:
        self._repo(repo)
        with self._lock:
            expected_size = self._announced_lfs.get(oid)
        if expected_size is None:
            raise HubError(403, f"LFS object {oid} was not announced by a batch request")
        content = request.body()
        if len(content) != expected_size or hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid}: content does not match the announced sha256 and size")
        self._store_blob(content)
        with self._lock:
            self._announced_lfs.pop(oid, None)
        return 200, {}

    def lfs_verify(self, request: _Request, repo: str) -> tuple[int, Any]:
        request.require_token()
        payload = request.json()
        self._repo(repo)
        with self._lock:
            size = self._blob_sizes.get(str(payload.get("oid")))
        if size is None or size != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} not found")
        return 200, {}

    def commit(self, request: _Request, repo: str, rev: str) -> tuple[int, Any]:
        request.require_token()
        if request.query.get("create_pr", ["0"])[0] == "1":
            raise HubError(400, "The fake hub does not support pull requests")
        lines = [json.loads(line) for line in request.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        branch = unquote(rev)
        with self._lock:
            record = self._repo(repo)
            if branch not in record.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = record.commits[record.branches[branch]]
            if header.get("parentCommit") not in (None, head.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = _validate_path(value.get("path", ""))
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    content = base64.b64decode(value["content"], validate=True)
                    files[path] = FileEntry(self._store_blob(content), len(content), git_blob_oid(content), lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    if value.get("algo") != "sha256" or oid not in self._blob_sizes:
                        raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                    content = self._blob_path(oid).read_bytes()
                    files[path] = FileEntry(oid, len(content), git_blob_oid(content), lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    files = {name: entry for name, entry in files.items() if not name.startswith(path + "/")}
                else:
                    raise HubError(400, f"The fake hub does not support commit operation {key!r}")
            commit = self._new_commit(record, head.oid, str(header.get("summary", "")), files)
        return 200, {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}",
            "hookOutput": "",
        }

    def resolve(self, request: _Request, repo: str, rev: str, path: str) -> tuple[int, Any]:
        with self._lock:
            commit = self._repo(repo).resolve(unquote(rev))
            filename = unquote(path)
            entry = commit.files.get(filename)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = self._blob_path(entry.sha256).read_bytes()
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.etag}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        status = 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if ranged is not None and request.method == "GET":
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) if ranged.group(2) else len(content) - 1, len(content) - 1)
            if start >= len(content):
                raise HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content = content[start : end + 1]
            status = 206
        return status, _Raw(content, headers)


@dataclass(frozen=True)
class _Raw:
    content: bytes
    headers: dict[str, str]


class _Request:
    def __init__(self, hub: FakeHub, handler: BaseHTTPRequestHandler, method: str):
        self.hub = hub
        self.handler = handler
        self.method = method
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = parse_qs(parts.query)
        self.headers = handler.headers
        self._body: bytes | None = None

    def require_token(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self._read_body())
        return self._body

    def json(self) -> dict[str, Any]:
        try:
            payload = json.loads(self.body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None
        if not isinstance(payload, dict):
            raise HubError(400, "The JSON body must be an object")
        return payload

    def _read_body(self) -> Iterator[bytes]:
        stream, limit = self.handler.rfile, self.hub.max_request_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while stream.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > limit:
                    raise HubError(413, f"Request body over the fake hub's limit of {limit} bytes")
                yield stream.read(size)
                stream.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise HubError(413, f"Request body over the fake hub's limit of {limit} bytes")
        if length:
            yield stream.read(length)


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeHub/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            request = _Request(hub, self, method)
            try:
                for route_method, pattern, name in _ROUTES:
                    match = pattern.fullmatch(request.path)
                    if match is not None and route_method == method:
                        groups = {key: value for key, value in match.groupdict().items() if value is not None}
                        status, payload = getattr(hub, name)(request, **groups)
                        break
                else:
                    hub.unhandled.append((method, self.path))
                    raise HubError(404, f"The fake hub has no route for {method} {request.path}")
            except HubError as error:
                status = error.status
                headers = {"X-Error-Message": error.message, **error.headers}
                if error.code:
                    headers["X-Error-Code"] = error.code
                payload = _Raw(json.dumps({"error": error.message}).encode(), headers)
                if status == 413:
                    self.close_connection = True
            except Exception as error:
                status = 500
                payload = _Raw(json.dumps({"error": f"fake hub bug: {error!r}"}).encode(), {})
            if not isinstance(payload, _Raw):
                payload = _Raw(json.dumps(payload).encode(), {"Content-Type": "application/json"})
            # Drain an unread request body so the connection stays usable.
            if request._body is None and not self.close_connection:
                try:
                    request.body()
                except HubError:
                    self.close_connection = True
            hub.requests.append((method, self.path, status))
            self.send_response(status)
            headers = {"Content-Type": "application/json", **payload.headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload.content)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload.content)

    return Handler
