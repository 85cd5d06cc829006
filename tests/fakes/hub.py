"""A loopback fake of the Hugging Face Hub that the real clients download from and push to.

It answers the calls huggingface_hub (with ``HF_HUB_DISABLE_XET=1``), datasets and transformers make:
repo info with the commit sha, tree listings (recursive, paginated with ``Link: rel="next"``),
``paths-info``, HEAD/GET ``resolve`` with ``X-Repo-Commit``/``ETag``/sizes and byte ranges, LFS files
redirected to a signed "CDN" URL on another host name (``localhost``) like the real Hub, 404s with
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), repo creation (409 when it
exists), ``validate-yaml``, ``preupload``, the LFS batch API with presigned PUT + verify, NDJSON commits
(``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``; every commit a new sha), branches, refs,
commit history, settings, deletion, ``whoami-v2``. Private repos answer 401 ``RepoNotFound`` without a
valid token; a wrong token is 401 "Invalid credentials in Authorization header"; writes need the token.

Storage lives on disk under ``root`` (a temp dir when none is given): content-addressed ``objects/``,
one JSON state file per repo under ``repos/``, and the main branch as plain files under
``checkouts/{models,datasets}/<repo_id>/`` so a test can look at exactly what was pushed.

In a test (set ``HF_ENDPOINT`` etc. in the client's environment: see ``tests/hub_support.py``)::

    with FakeHub(token="hf_test") as hub:
        hub.add_repo("meta-llama/Meta-Llama-3-8B-Instruct", tiny_model_dir)
        hub.fail_next("commit", 504, times=2)
        ...

As a process (prints its URL on the first line of stdout; ``POST /_fake/fail`` injects failures)::

    python3 -m tests.fakes.hub --port 0 --token TOKEN --root DIR
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

REPO_TYPES = ("model", "dataset", "space")
# Per-repo API actions: /api/{type}s/{repo_id}/{action}/...
API_ACTIONS = ("revision", "tree", "paths-info", "preupload", "commit", "branch", "refs", "commits", "settings")
ROUTES = {
    "whoami", "create_repo", "delete_repo", "repo_settings", "validate_yaml", "repo_info", "tree",
    "paths_info", "preupload", "commit", "branch", "refs", "commits", "lfs_batch", "lfs_verify",
    "lfs_upload", "resolve", "cdn",
}  # fmt: skip
WRITE_ROUTES = {"create_repo", "delete_repo", "repo_settings", "preupload", "commit", "branch", "lfs_batch",
                "lfs_verify"}  # fmt: skip
# The real Hub stores files from 10 MB up in LFS whatever their name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
INVALID_TOKEN = "Invalid credentials in Authorization header"

# What the Hub puts in a new repo's first commit (the usual LFS patterns, abridged).
LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
]
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)


class HubError(Exception):
    """An error answer: HTTP status, message and optional X-Error-Code."""

    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class FileEntry:
    size: int
    sha256: str
    git_oid: str  # sha1 of the git blob, what the Hub reports as `oid` for regular files
    lfs: bool


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def prefix(self):
        """URL prefix of the repo's web paths: '' for models, 'datasets/' for datasets."""
        return "" if self.repo_type == "model" else f"{self.repo_type}s/"

    def head(self, branch="main"):
        return self.commits[self.branches[branch]]

    def resolve(self, revision):
        revision = revision or "main"
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass
class RequestRecord:
    method: str
    route: str | None
    path: str
    status: int = 0


def _now():
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small file git stores in place of an LFS file; the Hub reports its blob oid for LFS files."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubStore:
    """Repos, commits and file contents, kept on disk under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = 0
        self._load()

    # -- persistence ---------------------------------------------------------------------------

    def _state_file(self, repo):
        return self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"

    def _load(self):
        for path in sorted((self.root / "repos").glob("*/**/*.json")):
            data = json.loads(path.read_text())
            commits = {
                sha: Commit(**{**c, "files": {p: FileEntry(**e) for p, e in c["files"].items()}})
                for sha, c in data.pop("commits").items()
            }
            repo = Repo(**data, commits=commits)
            self.repos[(repo.repo_type, repo.repo_id)] = repo

    def save(self, repo):
        path = self._state_file(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(repo), indent=1))
        tmp.replace(path)
        self._write_checkout(repo)

    def checkout_dir(self, repo_type, repo_id) -> Path:
        return self.root / "checkouts" / f"{repo_type}s" / repo_id

    def _write_checkout(self, repo):
        out = self.checkout_dir(repo.repo_type, repo.repo_id)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for path, entry in repo.head().files.items():
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.objects / entry.sha256, target)

    # -- objects -------------------------------------------------------------------------------

    def put_object(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.objects / sha256
        if not target.exists():
            tmp = target.with_name(f"{sha256}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(content)
            tmp.replace(target)
        return sha256

    def has_object(self, sha256, size=None):
        path = self.objects / sha256
        return path.is_file() and (size is None or path.stat().st_size == size)

    def read_object(self, sha256) -> bytes:
        return (self.objects / sha256).read_bytes()

    # -- repos and commits ---------------------------------------------------------------------

    def get(self, repo_type, repo_id) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def create(self, repo_type, repo_id, private) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, bool(private), _now())
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, "main", "initial commit", "", {".gitattributes": DEFAULT_GITATTRIBUTES.encode()})
            return repo

    def delete(self, repo):
        with self.lock:
            del self.repos[(repo.repo_type, repo.repo_id)]
            self._state_file(repo).unlink(missing_ok=True)
            shutil.rmtree(self.checkout_dir(repo.repo_type, repo.repo_id), ignore_errors=True)

    def file_entry(self, content: bytes, lfs: bool) -> FileEntry:
        sha256 = self.put_object(content)
        blob = lfs_pointer(sha256, len(content)) if lfs else content
        return FileEntry(len(content), sha256, git_blob_oid(blob), lfs)

    def commit(self, repo, branch, title, message, added=None, entries=None, deleted=(), parent_commit=None):
        """Apply additions (path -> bytes, LFS decided like the Hub), entries (path -> FileEntry) and
        deletions (paths; a trailing '/' deletes a folder) on `branch`; returns the new Commit."""
        with self.lock:
            if repo.branches and branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = repo.commits[repo.branches[branch]] if repo.branches else None
            if parent_commit and parent and parent_commit != parent.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files) if parent else {}
            for path in deleted:
                if path.endswith("/"):
                    gone = [p for p in files if p.startswith(path)]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                elif files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for path, content in (added or {}).items():
                files[path] = self.file_entry(content, self.is_lfs(files, path, len(content), content[:512]))
            files.update(entries or {})
            self._counter += 1
            seed = f"{repo.repo_type}/{repo.repo_id}\n{parent.sha if parent else ''}\n{title}\n{time.time_ns()}"
            sha = hashlib.sha1(f"{seed}\n{self._counter}\n{secrets.token_hex(8)}".encode()).hexdigest()
            commit = Commit(sha, parent.sha if parent else None, title, message, _now(), files)
            repo.commits[sha] = commit
            repo.branches[branch] = sha
            self.save(repo)
            return commit

    def is_lfs(self, files, path, size, sample: bytes) -> bool:
        """The Hub's rule: LFS when .gitattributes says so, when large, or when the content is binary."""
        if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample:
            return True
        attributes = files.get(".gitattributes")
        text = self.read_object(attributes.sha256).decode() if attributes else ""
        for line in text.splitlines():
            pattern, *attrs = line.split()
            if "filter=lfs" in attrs:
                target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatch(target, pattern.replace("**/", "*")):
                    return True
        return False


def _tree_entry(path, entry: FileEntry):
    item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                       "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
    return item


def _dir_entry(path, files):
    digest = hashlib.sha1("\n".join(f"{p}:{e.git_oid}" for p, e in sorted(files.items())).encode())
    return {"type": "directory", "oid": digest.hexdigest(), "size": 0, "path": path}


def _dirs_of(paths):
    dirs = set()
    for path in paths:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


class FakeHub:
    """The fake Hub server. `url` is what `HF_ENDPOINT` must be set to."""

    def __init__(self, token="hf_fake_token", *, user="tester", orgs=(), namespaces=None, root=None,
                 host="127.0.0.1", port=0, cdn_host="localhost", tree_page_size=100):
        self.token = token
        self.user = user
        self.orgs = list(orgs)
        # Namespaces the token may write to; None = any (most tests don't care who owns a repo).
        self.namespaces = None if namespaces is None else set(namespaces)
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="fake-hub-")
        self.root = Path(root or self._tmp.name)
        self.store = HubStore(self.root)
        self.host, self.port = host, port
        self.cdn_host = cdn_host  # None: serve LFS files directly instead of redirecting
        self.tree_page_size = tree_page_size
        self.requests: list[RequestRecord] = []
        self._failures: list[dict] = []
        self._secret = secrets.token_bytes(16)
        self._server = None
        self._thread = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def cdn_url(self):
        return f"http://{self.cdn_host or self.host}:{self.port}"

    @property
    def repos(self) -> dict[tuple[str, str], Repo]:
        """(repo_type, repo_id) -> Repo, e.g. hub.repos[("model", "me/x")].private."""
        return self.store.repos

    def start(self):
        self._server = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def fail_next(self, route, status=500, times=1, message=None):
        """Answer the next `times` requests of `route` (e.g. "commit", "preupload", "lfs_upload",
        "resolve", "repo_info", "create_repo") with `status` before doing anything."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(ROUTES)}")
        with self.store.lock:
            self._failures.append({"route": route, "status": int(status), "times": int(times),
                                   "message": message or f"Injected failure ({status})"})

    def requests_to(self, route, method=None) -> list[RequestRecord]:
        return [r for r in self.requests if r.route == route and (method is None or r.method == method)]

    def add_repo(self, repo_id, files=None, *, repo_type="model", private=False, message="Upload files"):
        """Create (or add a commit to) a repo directly, without the client: `files` is a folder or a
        mapping of repo path -> bytes | str | Path. Returns the new commit sha."""
        repo = self.repos.get((repo_type, repo_id)) or self.store.create(repo_type, repo_id, private)
        if isinstance(files, str | Path):
            folder = Path(files)
            files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        added = {}
        for path, value in (files or {}).items():
            added[path] = (value.read_bytes() if isinstance(value, Path)
                           else value.encode() if isinstance(value, str) else value)
        return self.store.commit(repo, "main", message, "", added).sha

    def read_file(self, repo_id, path, *, repo_type="model", revision="main") -> bytes:
        entry = self.store.get(repo_type, repo_id).resolve(revision).files[path]
        return self.store.read_object(entry.sha256)

    def list_files(self, repo_id, *, repo_type="model", revision="main") -> list[str]:
        return sorted(self.store.get(repo_type, repo_id).resolve(revision).files)

    def commits(self, repo_id, *, repo_type="model", branch="main") -> list[Commit]:
        """The branch's history, newest first."""
        repo = self.store.get(repo_type, repo_id)
        out, sha = [], repo.branches[branch]
        while sha:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    def checkout_dir(self, repo_id, *, repo_type="model") -> Path:
        return self.store.checkout_dir(repo_type, repo_id)

    # -- request plumbing ----------------------------------------------------------------------

    def _take_failure(self, route):
        with self.store.lock:
            for failure in self._failures:
                if failure["route"] == route and failure["times"] > 0:
                    failure["times"] -= 1
                    return failure
        return None

    def _sign(self, sha256):
        return hmac.new(self._secret, sha256.encode(), hashlib.sha256).hexdigest()[:32]

    def _signed_url(self, kind, sha256):
        return f"{self.cdn_url}/_{kind}/{sha256}?{urlencode({'sig': self._sign(sha256)})}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    # -- HTTP entry points ---------------------------------------------------------------------

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def do_DELETE(self):
        self._serve()

    def log_message(self, fmt, *args):  # quiet: the requests list is the log
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _serve(self):
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.segments = [s for s in split.path.split("/") if s != ""]
        self.body = self._read_body()
        record = RequestRecord(self.command, None, self.path)
        self.hub.requests.append(record)
        try:
            route, handler, args = self._route()
            record.route = route
            failure = self.hub._take_failure(route)
            if failure:
                raise HubError(failure["status"], failure["message"])
            self._authorize(route, args)
            handler(*args)
        except HubError as error:
            self._send_error(error)
        except Exception as error:  # a bug in the fake must not look like a network failure
            self._send_error(HubError(500, f"fake hub error: {error!r}"))
        record.status = self._status

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- routing -------------------------------------------------------------------------------

    def _route(self):
        seg, method = self.segments, self.command
        if seg[:1] == ["_fake"]:
            return "control", self._control, ()
        if seg[:1] == ["_cdn"] and len(seg) == 2 and method in ("GET", "HEAD"):
            return "cdn", self._cdn, (seg[1],)
        if seg[:1] == ["_lfs"] and len(seg) == 2 and method == "PUT":
            return "lfs_upload", self._lfs_put, (seg[1],)
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return "whoami", self._whoami, ()
            if rest == ["repos", "create"] and method == "POST":
                return "create_repo", self._create_repo, ()
            if rest == ["repos", "delete"] and method == "DELETE":
                return "delete_repo", self._delete_repo, ()
            if rest == ["validate-yaml"] and method == "POST":
                return "validate_yaml", self._validate_yaml, ()
            if rest and rest[0] in ("models", "datasets", "spaces"):
                return self._route_repo_api(rest[0][:-1], [unquote(s) for s in rest[1:]])
        else:
            return self._route_web(seg)
        raise HubError(404, f"Not found: {self.command} {self.path}")

    def _route_repo_api(self, repo_type, rest):
        if len(rest) >= 3 and rest[2] in API_ACTIONS:
            repo_id, action, args = f"{rest[0]}/{rest[1]}", rest[2], rest[3:]
        elif len(rest) >= 2 and rest[1] in API_ACTIONS:
            repo_id, action, args = rest[0], rest[1], rest[2:]
        elif 1 <= len(rest) <= 2 and self.command == "GET":
            return "repo_info", self._repo_info, (repo_type, "/".join(rest), None)
        else:
            raise HubError(404, f"Not found: {self.command} {self.path}")
        revision = args[0] if args else None
        table = {
            ("GET", "revision"): ("repo_info", self._repo_info, (repo_type, repo_id, revision)),
            ("GET", "tree"): ("tree", self._tree, (repo_type, repo_id, revision, "/".join(args[1:]))),
            ("POST", "paths-info"): ("paths_info", self._paths_info, (repo_type, repo_id, revision)),
            ("POST", "preupload"): ("preupload", self._preupload, (repo_type, repo_id, revision)),
            ("POST", "commit"): ("commit", self._commit, (repo_type, repo_id, revision)),
            ("POST", "branch"): ("branch", self._create_branch, (repo_type, repo_id, revision)),
            ("DELETE", "branch"): ("branch", self._delete_branch, (repo_type, repo_id, revision)),
            ("GET", "refs"): ("refs", self._refs, (repo_type, repo_id)),
            ("GET", "commits"): ("commits", self._commits, (repo_type, repo_id, revision)),
            ("PUT", "settings"): ("repo_settings", self._settings, (repo_type, repo_id)),
        }
        if (self.command, action) not in table:
            raise HubError(404, f"Not found: {self.command} {self.path}")
        return table[(self.command, action)]

    def _route_web(self, seg):
        repo_type = "model"
        if seg[:1] in (["datasets"], ["spaces"]):
            repo_type, seg = seg[0][:-1], seg[1:]
        for n in (2, 1):
            if len(seg) > n + 1 and seg[n] == "resolve" and self.command in ("GET", "HEAD"):
                repo_id = "/".join(unquote(s) for s in seg[:n])
                path = "/".join(unquote(s) for s in seg[n + 2:])
                return "resolve", self._resolve, (repo_type, repo_id, unquote(seg[n + 1]), path)
        # /{repo_id}.git/info/lfs/objects/{batch|verify}
        if len(seg) in (5, 6) and seg[-5].endswith(".git") and seg[-4:-1] == ["info", "lfs", "objects"]:
            repo_id = "/".join(unquote(s) for s in seg[:-4])[: -len(".git")]
            if seg[-1] == "batch" and self.command == "POST":
                return "lfs_batch", self._lfs_batch, (repo_type, repo_id)
            if seg[-1] == "verify" and self.command == "POST":
                return "lfs_verify", self._lfs_verify, (repo_type, repo_id)
        raise HubError(404, f"Not found: {self.command} {self.path}")

    # -- auth ----------------------------------------------------------------------------------

    def _bearer(self):
        header = self.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def _authorize(self, route, args):
        if route in ("cdn", "lfs_upload", "control"):
            return  # presigned URLs and test controls carry no token
        token = self._bearer()
        if token is not None and token != self.hub.token:
            raise HubError(401, INVALID_TOKEN)
        self.authenticated = token is not None
        if route in WRITE_ROUTES and not self.authenticated:
            raise HubError(401, "You must be authenticated to access this resource")

    def _check_write_namespace(self, repo_id):
        namespaces = self.hub.namespaces
        namespace = repo_id.split("/")[0] if "/" in repo_id else self.hub.user
        if namespaces is not None and namespace not in namespaces | {self.hub.user}:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace \"{namespace}\"")

    def _readable_repo(self, repo_type, repo_id) -> Repo:
        repo = self.hub.store.get(repo_type, repo_id)
        if repo.private and not self.authenticated:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    # -- answers -------------------------------------------------------------------------------

    def _send(self, status, body=b"", headers=None, content_type="application/json"):
        self._status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if content_type and "Content-Type" not in (headers or {}):
            self.send_header("Content-Type", content_type)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, error: HubError):
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, error.status, headers)

    def _json_body(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    # -- account and repos ---------------------------------------------------------------------

    def _whoami(self):
        if not self.authenticated:
            raise HubError(401, INVALID_TOKEN)
        self._send_json({
            "type": "user", "id": hashlib.sha1(self.hub.user.encode()).hexdigest()[:24], "name": self.hub.user,
            "fullname": self.hub.user, "email": None, "emailVerified": False, "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in self.hub.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "tests", "role": "write", "createdAt": _now()}},
        })  # fmt: skip

    def _repo_id_from_body(self, body):
        name, organization = body.get("name"), body.get("organization")
        if not name:
            raise HubError(400, "Missing repo name")
        return f"{organization or self.hub.user}/{name}", body.get("type") or "model"

    def _create_repo(self):
        body = self._json_body()
        repo_id, repo_type = self._repo_id_from_body(body)
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        self._check_write_namespace(repo_id)
        private = body.get("private", body.get("visibility") == "private")
        url = f"{self.hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        try:
            repo = self.hub.store.create(repo_type, repo_id, private)
        except HubError as error:  # 409: the Hub also says where the existing repo is
            self._send_json({"error": error.message, "url": url}, error.status, {"X-Error-Message": error.message})
            return
        self._send_json({"url": url, "name": repo.repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _delete_repo(self):
        repo_id, repo_type = self._repo_id_from_body(self._json_body())
        repo = self.hub.store.get(repo_type, repo_id)
        self._check_write_namespace(repo_id)
        self.hub.store.delete(repo)
        self._send_json({})

    def _settings(self, repo_type, repo_id):
        repo = self._readable_repo(repo_type, repo_id)
        self._check_write_namespace(repo_id)
        body = self._json_body()
        with self.hub.store.lock:
            if "private" in body:
                repo.private = bool(body["private"])
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
            self.hub.store.save(repo)
        self._send_json({})

    def _validate_yaml(self):
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            front, sep, _ = content[3:].partition("\n---")
            try:
                import yaml

                data = yaml.safe_load(front) if sep else None
                if sep and data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except ImportError:
                pass
            except Exception as error:  # yaml.YAMLError and friends
                errors.append({"message": f"Invalid YAML in README.md: {error}"})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _repo_info(self, repo_type, repo_id, revision):
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256,
                                      "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
            siblings.append(sibling)
        self._send_json({
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        })  # fmt: skip

    # -- listing -------------------------------------------------------------------------------

    def _last_commits(self, repo, commit, paths):
        """Path -> the newest commit that changed it (for expand=True)."""
        out, current = {}, commit
        while current and len(out) < len(paths):
            parent = repo.commits.get(current.parent) if current.parent else None
            for path in paths:
                if path in out:
                    continue
                now = {p: e.git_oid for p, e in current.files.items() if p == path or p.startswith(path + "/")}
                before = {p: e.git_oid for p, e in (parent.files.items() if parent else ())
                          if p == path or p.startswith(path + "/")}
                if now != before:
                    out[path] = {"id": current.sha, "title": current.title, "date": current.date}
            current = parent
        return out

    def _entries(self, repo, commit, paths_wanted=None, under="", recursive=False, expand=False):
        files = commit.files
        dirs = _dirs_of(files)
        if paths_wanted is not None:
            names = [p for p in paths_wanted if p in files or p in dirs]
        else:
            prefix = f"{under}/" if under else ""
            if under and under not in dirs:
                raise HubError(404, f"Entry not found: {under}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
            candidates = [p for p in sorted(set(files) | dirs) if p.startswith(prefix)]
            names = candidates if recursive else [p for p in candidates if "/" not in p[len(prefix):]]
            names.sort(key=lambda p: (p not in dirs, p))  # folders first, like the Hub
        entries = []
        for name in names:
            if name in files:
                entries.append(_tree_entry(name, files[name]))
            else:
                inside = {p: e for p, e in files.items() if p.startswith(name + "/")}
                entries.append(_dir_entry(name, inside))
        if expand:
            last = self._last_commits(repo, commit, [e["path"] for e in entries])
            for entry in entries:
                entry["lastCommit"] = last.get(entry["path"])
        return entries

    def _tree(self, repo_type, repo_id, revision, under):
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        entries = self._entries(repo, commit, under=under.strip("/"), recursive=recursive, expand=expand)
        start = int(self.query.get("cursor") or 0)
        page = self.hub.tree_page_size
        headers = {}
        if start + page < len(entries):
            query = {**self.query, "cursor": str(start + page)}
            next_url = f"{self.hub.url}{urlsplit(self.path).path}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(entries[start: start + page], headers=headers)

    def _paths_info(self, repo_type, repo_id, revision):
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        if "json" in self.headers.get("Content-Type", ""):
            form = self._json_body()
            paths = form.get("paths", [])
            expand = bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        paths = [p.strip("/") for p in paths]
        self._send_json(self._entries(repo, commit, paths_wanted=paths, expand=expand))

    def _refs(self, repo_type, repo_id):
        repo = self._readable_repo(repo_type, repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(repo.branches.items())]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_type, repo_id, revision):
        repo = self._readable_repo(repo_type, repo_id)
        commit, out = repo.resolve(revision), []
        while commit:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                        "date": commit.date, "authors": [{"user": self.hub.user}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(out)

    # -- downloads -----------------------------------------------------------------------------

    def _resolve(self, repo_type, repo_id, revision, path):
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size,
                            "ETag": f'"{entry.git_oid}"'})
            if self.hub.cdn_host:
                # Like the real Hub: the content is on a signed URL of another host, so no token goes there.
                headers["Location"] = self.hub._signed_url("cdn", entry.sha256)
                self._send(302, b"", headers, content_type="text/plain")
                return
            headers["ETag"] = f'"{entry.sha256}"'
        else:
            headers["ETag"] = f'"{entry.git_oid}"'
        self._send_content(entry.sha256, headers)

    def _send_content(self, sha256, headers):
        content = self.hub.store.read_object(sha256)
        status, total = 200, len(content)
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[6:].split(",")[0].strip().partition("-")
            if first == "":
                start, end = max(total - int(last), 0), total - 1
            else:
                start, end = int(first), min(int(last), total - 1) if last else total - 1
            if start >= total or start > end:
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
                return
            content, status = content[start: end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        self._send(status, content, headers, content_type="application/octet-stream")

    def _cdn(self, sha256):
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub._sign(sha256)):
            raise HubError(403, "Request has expired or the signature does not match")
        if not self.hub.store.has_object(sha256):
            raise HubError(404, "NoSuchKey")
        self._send_content(sha256, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    # -- uploads -------------------------------------------------------------------------------

    def _writable_repo(self, repo_type, repo_id) -> Repo:
        repo = self._readable_repo(repo_type, repo_id)
        self._check_write_namespace(repo_id)
        return repo

    def _preupload(self, repo_type, repo_id, revision):
        repo = self._writable_repo(repo_type, repo_id)
        head = repo.resolve(revision)
        store, answers = self.hub.store, []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = store.is_lfs(head.files, item["path"], int(item.get("size", 0)), sample)
            existing = head.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else existing.git_oid
            answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": head.sha})

    def _lfs_batch(self, repo_type, repo_id):
        self._writable_repo(repo_type, repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only uploads are supported")
        repo_path = f"{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.store.has_object(oid, size):
                answer["actions"] = {
                    "upload": {"href": self.hub._signed_url("lfs", oid), "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo_path}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid):
        if self.command != "PUT":
            raise HubError(405, "Method not allowed")
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub._sign(oid)):
            raise HubError(403, "Request has expired or the signature does not match")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "The content does not match its sha256 (BadDigest)")
        self.hub.store.put_object(self.body)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}, content_type=None)

    def _lfs_verify(self, repo_type, repo_id):
        self._writable_repo(repo_type, repo_id)
        body = self._json_body()
        if not self.hub.store.has_object(body.get("oid", ""), body.get("size")):
            raise HubError(404, f"Object {body.get('oid')} was not uploaded")
        self._send_json({"success": True})

    def _commit(self, repo_type, repo_id, revision):
        repo = self._writable_repo(repo_type, repo_id)
        if self.query.get("create_pr") in ("1", "true"):
            raise HubError(400, "Pull requests are not supported by this Hub")
        header, entries, deleted = {}, {}, []
        store = self.hub.store
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
                entries[value["path"]] = store.file_entry(content, lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                if not store.has_object(oid):
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                        f"does not exist: {value['path']} ({oid})")
                size = (store.objects / oid).stat().st_size
                entries[value["path"]] = FileEntry(size, oid, git_blob_oid(lfs_pointer(oid, size)), True)
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"]
                deleted.append(path.rstrip("/") + "/" if key == "deletedFolder" else path)
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        if not header.get("summary"):
            raise HubError(400, "The commit summary is required")
        commit = store.commit(repo, revision or "main", header["summary"], header.get("description", ""),
                              entries=entries, deleted=deleted, parent_commit=header.get("parentCommit"))
        self._send_json({"success": True, "commitOid": commit.sha, "hookOutput": "",
                         "commitUrl": f"{self.hub.url}/{repo.prefix}{repo_id}/commit/{commit.sha}"})

    def _create_branch(self, repo_type, repo_id, branch):
        repo = self._writable_repo(repo_type, repo_id)
        start = self._json_body().get("startingPoint")
        with self.hub.store.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(start).sha
            self.hub.store.save(repo)
        self._send_json({})

    def _delete_branch(self, repo_type, repo_id, branch):
        repo = self._writable_repo(repo_type, repo_id)
        with self.hub.store.lock:
            if branch == "main" or branch not in repo.branches:
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
            del repo.branches[branch]
            self.hub.store.save(repo)
        self._send_json({})

    # -- controls for tests that run the fake as a process -------------------------------------

    def _control(self):
        action = self.segments[1:2]
        if action == ["fail"] and self.command == "POST":
            body = self._json_body()
            self.hub.fail_next(body["route"], body.get("status", 500), body.get("times", 1), body.get("message"))
            self._send_json({"ok": True})
        elif action == ["requests"] and self.command == "GET":
            self._send_json([asdict(r) for r in self.hub.requests])
        else:
            raise HubError(404, "Unknown control")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the fake Hugging Face Hub on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=os.environ.get("FAKE_HUB_TOKEN", "hf_fake_token"))
    parser.add_argument("--user", default="tester")
    parser.add_argument("--root", required=True, help="storage directory (objects/, repos/, checkouts/)")
    parser.add_argument("--cdn-host", default="localhost", help="host name of LFS download URLs; '' to serve inline")
    parser.add_argument("--tree-page-size", type=int, default=100)
    args = parser.parse_args(argv)
    hub = FakeHub(args.token, user=args.user, root=args.root, port=args.port, cdn_host=args.cdn_host or None,
                  tree_page_size=args.tree_page_size).start()
    print(hub.url, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    hub.stop()


if __name__ == "__main__":
    main()
