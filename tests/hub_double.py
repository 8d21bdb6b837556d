"""A local HTTP test double of the Hugging Face Hub, so push tests run offline and can see every request.

It serves, on 127.0.0.1, the endpoints `huggingface_hub.HfApi` uses to create a repo, a branch and a
commit (preupload, the plain LFS batch/PUT/verify protocol, NDJSON commit with added and deleted files),
to list a branch's files (`repo_info`) and to download one (`hf_hub_download`: HEAD, then GET of
/<repo>/resolve/<rev>/<path>), keeps the committed bytes per branch, and answers errors with the status, JSON body and `X-Error-Code`/`X-Error-Message` headers
the real Hub sends, so the client raises the same exception classes it would against the Hub.

Clients must run with `HF_ENDPOINT=hub.url`, `HF_HUB_OFFLINE=0` and `HF_HUB_DISABLE_XET=1` (Xet uploads
are not served). Stdlib only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png")
LFS_MIN_SIZE = 1_000_000  # larger files go through LFS, as the Hub's 10 MB rule would, scaled down
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO = r"(?P<repo>[^/]+/[^/]+?)"  # "namespace/name", sent unquoted by the client


@dataclass
class Recorded:
    """One request as received: tests assert on the calls made, not only on their outcome.

    `path` is the raw path (URL-quoted as sent, without the query), `query` the raw query string,
    `headers` has lower-cased names, `body` is the de-chunked request body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""


@dataclass
class Commit:
    """One commit applied to a branch; `paths` are the added or updated files, in commit order."""

    revision: str
    message: str
    paths: list[str]
    oid: str = ""
    description: str = ""
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    """A repo's state: branch -> path -> bytes, the commits in order, and each branch's head oid."""

    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[Commit] = field(default_factory=list)
    type: str = "model"
    heads: dict[str, str] = field(default_factory=dict)


class _HubError(Exception):
    """An error answer, raised inside a handler: status, message, and the Hub's X-Error-Code if any."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def _git_blob_oid(data: bytes) -> str:
    """The oid the Hub reports for a regular file, and that the client compares to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


class HubDouble:
    """Context manager. `with HubDouble(token="hf_test_secret") as hub: hub.url  -> "http://127.0.0.1:PORT"`

    State tests can read (and seed): `requests`, `repos`, `lfs` (oid -> bytes uploaded through LFS),
    `unmatched` (requests no route served). `fail_next` injects errors."""

    def __init__(self, token: str = "hf_test_secret", user: str = "test-user", role: str = "write",
                 scoped: list[dict] | None = None):
        self.token = token
        self.user = user  # namespace for repo ids given without one, and the whoami name
        self.role, self.scoped = role, scoped or []  # what whoami says the token may do: read, write, fineGrained
        self.url = ""
        self.requests: list[Recorded] = []
        self.unmatched: list[Recorded] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self._failures: list[list] = []  # [method, compiled regex, status, times left, echo headers]
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._snapshots: dict[str, dict[str, bytes]] = {}  # commit oid -> files, so a branch can start there
        self._routes = [
            ("GET", re.compile(r"/api/whoami-v2"), self._whoami),
            ("POST", re.compile(r"/api/repos/create"), self._create_repo),
            ("POST", re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ("POST", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/branch/(?P<rev>[^/]+)"),
             self._create_branch),
            ("POST", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)"),
             self._preupload),
            ("POST", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)"),
             self._commit),
            ("GET", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/refs"), self._refs),
            ("GET", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
             self._tree),
            ("GET", re.compile(rf"/api/(?P<type>models|datasets|spaces)/{_REPO}(?:/revision/(?P<rev>[^/]+))?"),
             self._repo_info),
            ("POST", re.compile(rf"/(?P<type>datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/batch"), self._lfs_batch),
            ("POST", re.compile(rf"/(?P<type>datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/verify"),
             self._lfs_verify),
            ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), self._lfs_put),
            *((verb, re.compile(rf"/(?P<type>datasets/|spaces/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
               self._resolve) for verb in ("HEAD", "GET")),
        ]

    # ----- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> HubDouble:  # noqa: PYI034 - typing.Self needs Python 3.11
        double = self

        class Handler(_Handler):
            hub = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-double", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop serving and drop kept-alive connections, so no thread outlives the test."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    # ----- test API --------------------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, status: int, times: int = 1, echo_headers: bool = False) -> None:
        """The next `times` matching requests get `status` (e.g. 503 to test retries, 403) with a JSON {"error": ...} body.

        `path_regex` is searched in the raw request path (without the query). Injected failures come
        before the auth check and change no state. `echo_headers`: the error message quotes the request's
        headers, Authorization included, as a misconfigured proxy does."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(path_regex), status, times, echo_headers])

    def commit_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main", message: str = "by hand") -> None:
        """Commit `files` to a branch directly, as a user editing the repo outside finetune would."""
        with self._lock:
            repo = self.repos[repo_id]
            repo.branches[revision] = {**repo.branches[revision], **files}
            repo.heads[revision] = oid = self._new_oid(repo_id, revision, message)
            self._snapshots[oid] = dict(repo.branches[revision])
            repo.commits.append(Commit(revision, message, list(files), oid))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """A copy of a branch's files: path -> bytes, exactly as committed."""
        with self._lock:
            return dict(self.repos[repo_id].branches[revision])

    # ----- dispatch --------------------------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict | bytes, dict]:
        """Record, inject failures, check auth, route. Returns (status, JSON body or a file's bytes, extra headers)."""
        path, _, query = raw_path.partition("?")
        record = Recorded(method, path, headers, body, query)
        with self._lock:
            self.requests.append(record)
            for failure in self._failures:
                if failure[0] == method and failure[3] > 0 and failure[1].search(path):
                    failure[3] -= 1
                    message = f"HubDouble: injected HTTP {failure[2]} for {method} {path}"
                    if failure[4]:
                        message += " with request headers: " + "; ".join(f"{k}: {v}" for k, v in headers.items())
                    return failure[2], {"error": message}, {"X-Error-Message": message}
            route = next(
                ((handler, match) for verb, regex, handler in self._routes
                 if verb == method and (match := regex.fullmatch(path))),
                None,
            )
            if route is None:  # before auth, so a test sees every unexpected call here
                self.unmatched.append(record)
                message = f"HubDouble: no route for {method} {path}"
                return 404, {"error": message}, {"X-Error-Message": message}
            handler, match = route
            # The LFS PUT goes to storage through a pre-signed URL, and `ModelCard.validate` posts to
            # validate-yaml anonymously: the client sends no token there, as the real Hub allows.
            given = headers.get("authorization")
            anonymous_ok = given is None and handler in (self._lfs_put, self._validate_yaml)
            if given != f"Bearer {self.token}" and not anonymous_ok:
                return 401, {"error": INVALID_CREDENTIALS}, {"X-Error-Message": INVALID_CREDENTIALS}
            try:
                answer = handler(match.groupdict(), body, parse_qs(query))
                return (200, *answer) if isinstance(answer, tuple) else (200, answer, {})  # (bytes, headers): a file
            except _HubError as err:
                extra = {"X-Error-Message": err.message}
                if err.code:
                    extra["X-Error-Code"] = err.code
                return err.status, {"error": err.message, **err.extra}, extra
            except Exception as exc:  # noqa: BLE001 - a malformed payload or a bug here: answer, keep the connection
                message = f"HubDouble internal error: {exc!r}"
                return 500, {"error": message}, {"X-Error-Message": message}

    # ----- helpers ---------------------------------------------------------------------------------

    def _new_oid(self, *parts: object) -> str:
        self._counter += 1
        return hashlib.sha1(repr((self._counter, *parts)).encode()).hexdigest()

    def _repo(self, groups: dict) -> tuple[str, Repo]:
        repo_id = groups["repo"]
        kind = _TYPES[(groups.get("type") or "models").strip("/")]
        repo = self.repos.get(repo_id)
        if repo is None or repo.type != kind:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo_id, repo

    @staticmethod
    def _branch(repo: Repo, revision: str) -> dict[str, bytes]:
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.branches[revision]

    def _head(self, repo_id: str, repo: Repo, branch: str) -> str:
        if branch not in repo.heads:
            repo.heads[branch] = self._new_oid(repo_id, branch, "initial commit")
        return repo.heads[branch]

    def _repo_url(self, repo_id: str, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.type]}{repo_id}"

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _HubError(400, "Invalid JSON body") from None
        if not isinstance(data, dict):
            raise _HubError(400, "Invalid JSON body")
        return data

    # ----- routes ----------------------------------------------------------------------------------

    def _whoami(self, groups, body, query) -> dict:
        access = {"displayName": "test", "role": self.role}
        if self.role == "fineGrained":
            access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": self.scoped}
        return {"type": "user", "name": self.user, "orgs": [{"name": "test-org"}],
                "auth": {"type": "access_token", "accessToken": access}}

    def _create_repo(self, groups, body, query) -> dict:
        """`create_repo` sends name, organization (None for the user's namespace), type, visibility."""
        data = self._json(body)
        name = data.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise _HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{data.get('organization') or self.user}/{name}"
        kind = data.get("type") or "model"
        if kind not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {kind!r}")
        if repo_id in self.repos:
            existing = self.repos[repo_id]
            # `exist_ok=True` reads `url` from this 409 body.
            raise _HubError(409, f"You already created this {existing.type} repo",
                            url=self._repo_url(repo_id, existing))
        private = data["private"] if isinstance(data.get("private"), bool) else data.get("visibility") == "private"
        self.repos[repo_id] = repo = Repo(private=private, type=kind)
        self._head(repo_id, repo, "main")
        return {"url": self._repo_url(repo_id, repo), "name": repo_id, "id": self._new_oid(repo_id)[:24]}

    def _validate_yaml(self, groups, body, query) -> dict:
        self._json(body)
        return {"errors": [], "warnings": []}

    def _create_branch(self, groups, body, query) -> dict:
        repo_id, repo = self._repo(groups)
        branch = unquote(groups["rev"])
        if branch.startswith("refs/") or not branch:
            raise _HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")  # exist_ok checks for 409
        start = self._json(body).get("startingPoint") or "main"
        if start in repo.branches:
            source, head = repo.branches[start], self._head(repo_id, repo, start)
        else:
            commit = next((c for c in repo.commits if c.oid.startswith(start) and len(start) >= 7), None)
            if commit is None:
                raise _HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            source, head = self._snapshots[commit.oid], commit.oid
        repo.branches[branch] = dict(source)
        repo.heads[branch] = head
        return {}

    def _preupload(self, groups, body, query) -> dict:
        """Per file: uploadMode by suffix/size, shouldIgnore, and the remote oid the client uses to skip
        unchanged files (git blob sha1 for regular files, sha256 for LFS ones)."""
        _, repo = self._repo(groups)
        revision = unquote(groups["rev"])
        files = {} if query.get("create_pr") else self._branch(repo, revision)
        answers = []
        for item in self._json(body).get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            mode = "lfs" if _is_lfs(path, size) else "regular"
            oid = None
            if path in files:
                existing = files[path]
                if mode == "lfs":
                    oid = hashlib.sha256(existing).hexdigest()
                else:
                    oid = _git_blob_oid(existing)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answers}

    def _lfs_batch(self, groups, body, query) -> dict:
        """Upload actions point back at this double; objects already stored get no actions (as LFS does)."""
        repo_id, repo = self._repo(groups)
        data = self._json(body)
        if data.get("operation") != "upload":
            raise _HubError(400, "HubDouble only serves LFS uploads")
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:
                verify = f"{self.url}/{_URL_PREFIX[repo.type]}{repo_id}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": verify, "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _lfs_put(self, groups, body, query) -> dict:
        oid = groups["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match oid {oid}")
        self.lfs[oid] = body
        return {}

    def _lfs_verify(self, groups, body, query) -> dict:
        self._repo(groups)
        data = self._json(body)
        stored = self.lfs.get(data.get("oid", ""))
        if stored is None or len(stored) != data.get("size"):
            raise _HubError(404, f"LFS object {data.get('oid')} not found or wrong size")
        return {}

    def _commit(self, groups, body, query) -> dict:
        """Apply an NDJSON commit atomically: header, file (base64), lfsFile (oid), deletedFile/Folder lines."""
        repo_id, repo = self._repo(groups)
        revision = unquote(groups["rev"])
        base = self._branch(repo, revision)
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, "Invalid NDJSON commit payload") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The commit payload must start with a header line")
        header = lines[0].get("value") or {}
        message = header.get("summary") or ""
        if not message:
            raise _HubError(400, "A commit summary is required")
        parent = header.get("parentCommit")
        if parent and not query.get("create_pr") and not self._head(repo_id, repo, revision).startswith(parent):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        files, added, deleted = dict(base), [], []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding for {path}")
                files[path] = base64.b64decode(value.get("content", ""))
                added.append(path)
            elif key == "lfsFile":
                stored = self.lfs.get(value.get("oid", ""))
                if stored is None:
                    raise _HubError(400, f"LFS file {path} (oid {value.get('oid')}) was not uploaded")
                if "size" in value and value["size"] != len(stored):
                    raise _HubError(400, f"LFS file {path}: size does not match the uploaded object")
                files[path] = stored
                added.append(path)
            elif key in ("deletedFile", "deletedFolder"):
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p == path] if key == "deletedFile" else [
                    p for p in files if p.startswith(prefix)]
                if not gone:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.extend(gone)
            else:
                raise _HubError(400, f"Unsupported commit operation: {key!r}")

        target, pr_url = revision, None
        if query.get("create_pr"):
            number = 1 + sum(b.startswith("refs/pr/") for b in repo.branches)
            target = f"refs/pr/{number}"
            pr_url = f"{self._repo_url(repo_id, repo)}/discussions/{number}"
        oid = self._new_oid(repo_id, target, message, sorted(files.items()))
        repo.branches[target] = files
        repo.heads[target] = oid
        self._snapshots[oid] = dict(files)
        repo.commits.append(Commit(target, message, added, oid, header.get("description") or "", deleted))
        answer = {"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(repo_id, repo)}/commit/{oid}",
                  "hookOutput": ""}
        if pr_url:
            answer["pullRequestUrl"] = pr_url
        return answer

    def _resolve(self, groups, body, query) -> tuple[bytes, dict]:
        """A file's bytes, with the headers `hf_hub_download` reads from its HEAD request (the commit, the etag)."""
        repo_id, repo = self._repo(groups)
        revision = unquote(groups["rev"])
        files, commit = self._files_at(repo_id, repo, revision)
        path = unquote(groups["path"])
        if path not in files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        data = files[path]
        return data, {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_oid(data)}"'}

    def _refs(self, groups, body, query) -> dict:
        repo_id, repo = self._repo(groups)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": self._head(repo_id, repo, b)}
                    for b in repo.branches if not b.startswith("refs/")]
        pulls = [{"name": b, "ref": b, "targetCommit": self._head(repo_id, repo, b)}
                 for b in repo.branches if b.startswith("refs/pr/")]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": pulls}

    def _tree(self, groups, body, query) -> list:
        """`list_repo_tree(recursive=True)`, which `snapshot_download` reads: every file under a path, one page."""
        repo_id, repo = self._repo(groups)
        files, _ = self._files_at(repo_id, repo, unquote(groups["rev"]))
        under = unquote(groups.get("path") or "").strip("/")
        entries = []
        for path, data in sorted(files.items()):
            if under and not path.startswith(under + "/"):
                continue
            entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_oid(data)}
            if _is_lfs(path, len(data)):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _files_at(self, repo_id: str, repo: Repo, revision: str) -> tuple[dict[str, bytes], str]:
        """What a read sees at a branch or at one of the repo's commits (snapshot_download reads at the commit
        that repo_info named): the files and the commit."""
        if any(commit.oid == revision for commit in repo.commits):
            return self._snapshots[revision], revision
        return self._branch(repo, revision), self._head(repo_id, repo, revision)

    def _repo_info(self, groups, body, query) -> dict:
        """Enough of `repo_info` for the client's own fallbacks (empty commit, exist_ok after a 403)."""
        repo_id, repo = self._repo(groups)
        revision = unquote(groups.get("rev") or "main")
        files = self._branch(repo, revision)
        return {"id": repo_id, "private": repo.private, "sha": self._head(repo_id, repo, revision),
                "siblings": [{"rfilename": p} for p in sorted(files)]}


class _Handler(BaseHTTPRequestHandler):
    """Reads the whole request (Content-Length or chunked), hands it to the double, writes JSON back."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end on their own
    hub: HubDouble

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args) -> None:
        """Quiet: tests read `hub.requests` instead of the server log."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, payload, extra = self.hub._handle(self.command, self.path, headers, body)
        raw = isinstance(payload, bytes)
        data = payload if raw else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value.encode("latin-1", "replace").decode("latin-1"))  # headers are latin-1
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve
