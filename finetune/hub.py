"""Pushing a finished run to the Hugging Face Hub: one commit with the model files, the card
(rendered for the repo, so its snippet loads the repo), the card's pictures, and the run's recipe and
metrics.json under .finetune/ so that `finetune predict REPO_ID` can use the repo as it uses the run
directory (`download_pushed`).

A push also writes MANIFEST into the repo: the files it put there. A later push to the same branch
reads it and deletes, in its own commit, the files that earlier push put there and this one no
longer holds (the adapter after a switch to `--artifacts merged`); a file no push of finetune put
there (added by hand) is never deleted.

The token is huggingface_hub's business (HF_TOKEN, or `hf auth login`): it is never read into
a recipe, a log, a card or a message here. huggingface_hub retries its upload requests (preupload,
LFS) itself; the requests it sends once (create the repo, the branch, the commit) are retried here
on transient failures (network, 429, 5xx) with exponential backoff. Every failure ends in a
PushError that says how to retry, and leaves the run directory untouched.
"""

from __future__ import annotations

import importlib
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.card import method_of, render_card
from finetune.errors import FinetuneError
from finetune.redaction import redact, redacted_logs
from finetune.rundir import RunLayout, read_run

ATTEMPTS = 4
MANIFEST = ".finetune/pushed.json"
RECIPE = ".finetune/recipe.yaml"  # the run's recipe copy and metrics.json: what `finetune predict REPO_ID` reads
SUMMARY = ".finetune/metrics.json"
BACKOFF_ENV = "FINETUNE_PUSH_BACKOFF"  # seconds before the first retry (doubles each time); default 2


class PushError(FinetuneError):
    """The push failed; the run directory is complete and the message says how to retry."""


@dataclass
class PushTarget:
    repo_id: str
    revision: str = "main"
    private: bool | None = None
    artifacts: str = "adapter"  # adapter | merged | both (adapter methods only)
    include: list[str] = field(default_factory=list)  # logs | checkpoints | metrics
    commit_message: str | None = None


@dataclass
class PushPlan:
    target: PushTarget
    root: Path
    files: dict[str, Path | bytes]
    """Path in the repo → a local file, or the bytes of the card rendered for the repo."""
    card_metadata: str
    artifacts: list[dict] = field(default_factory=list)
    """Each artifact in the repo, {"subfolder": "" or "adapter", "adapter": bool, "files": [...]}, for `download_pushed`."""
    deleted: list[str] = field(default_factory=list)
    """Files an earlier push put in the branch that this one drops: the commit deletes them (see `read_deleted`)."""
    unread: str | None = None
    """Why the repo's manifest could not be read, for a dry run (None: it was read, or there is none)."""

    def describe(self) -> str:
        t = self.target
        visibility = {None: "the account's default", True: "private", False: "public"}[t.private]
        lines = [f"Would push {len(self.files)} files to {t.repo_id} (branch {t.revision}, new repo: {visibility}):"]
        for path, source in sorted(self.files.items()):
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            origin = "card rendered for the repo" if isinstance(source, bytes) else str(source.relative_to(self.root))
            lines.append(f"  {path:<48} {_size(size):>9}  ← {origin}")
        lines.append(f"  {MANIFEST:<48} {'':>9}  ← the list of these files, for the next push")
        if self.unread:
            lines += ["", f"Files an earlier push put there that this one would delete: unknown ({self.unread})."]
        elif self.deleted:
            lines += ["", f"Would delete {len(self.deleted)} files an earlier push put there that this one drops:"]
            lines += [f"  {path}" for path in self.deleted]
        lines += ["", "Card metadata:", self.card_metadata.rstrip()]
        return "\n".join(lines)


def prepare_push(root: Path, target: PushTarget) -> PushPlan:
    """What one commit will hold, with the card rendered for the repo. Checks the run directory and sends
    nothing; rendering the card rewrites its pictures in the run's images/ (they embed the same data)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from finetune.api import Artifact

    try:
        validate_repo_id(target.repo_id)
    except HFValidationError as exc:
        raise FinetuneError(f"--repo-id '{target.repo_id}' is not a valid Hub repo id: {exc}") from None
    run = read_run(root)
    layout = RunLayout(run.root)
    adapter = method_of(run).produces_adapter
    if target.artifacts != "adapter":
        if not adapter:
            raise FinetuneError(
                f"--artifacts {target.artifacts}: the method '{run.recipe.method.name}' saves a whole model, "
                "there is no adapter to merge. Push it without --artifacts."
            )
        if not layout.merged.is_dir():
            raise FinetuneError(
                f"--artifacts {target.artifacts}: {layout.merged} is missing (the run was made without "
                f"output.merged). Merge the adapter first: finetune export {shlex.quote(str(root))} --merged, "
                "then push again (or push the adapter alone)."
            )

    # "both": the merged model at the root (transformers finds an adapter_config.json at a repo's
    # root even when asked for a subfolder, so the adapter goes in adapter/ instead).
    files: dict[str, Path | bytes] = {}
    if target.artifacts == "adapter":
        trees = [(Artifact(target.repo_id, adapter=adapter), _tree(layout.model, ""))]
    else:
        trees = [(Artifact(target.repo_id, adapter=False), _tree(layout.merged, ""))]
        if target.artifacts == "both":
            trees.append((Artifact(target.repo_id, adapter=True, subfolder="adapter"), _tree(layout.model, "adapter/")))
    for _, tree in trees:
        files.update(tree)
    artifacts = [artifact for artifact, _ in trees]
    card = render_card(run, artifacts)  # also (re)writes the pictures it embeds
    files["README.md"] = card.encode()
    files.update(_tree(layout.images, "images/"))
    files[RECIPE] = layout.recipe
    files[SUMMARY] = layout.metrics
    extra = {"logs": [layout.steplog, *_tensorboard_files(layout.tracking)], "checkpoints": [layout.checkpoints],
             "metrics": [layout.metrics, layout.predictions]}
    for name in target.include:
        for path in extra[name]:
            repo_path = path.relative_to(run.root).as_posix()
            files.update(_tree(path, f"{repo_path}/") if path.is_dir() else {repo_path: path} if path.is_file() else {})
    from huggingface_hub import ModelCard

    where = [{"subfolder": a.subfolder or "", "adapter": a.adapter, "files": sorted(tree)} for a, tree in trees]
    return PushPlan(target, run.root, files, artifacts=where, card_metadata=ModelCard(card).data.to_yaml())


def _tensorboard_files(folder: Path) -> list[Path]:
    """TensorBoard's event files and hyperparameters (the Hub shows them in its TensorBoard tab); the other
    trackers' local files (W&B's run folder) stay behind."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.name.startswith("events.out.tfevents.")
                                                                   or p.name == "hparams.yml"))


def _tree(folder: Path, prefix: str) -> dict[str, Path]:
    """Every file under `folder`, keyed by its path in the repo. Hidden and temporary files stay
    behind, and so does a model folder's own README.md (peft writes a stub): the card replaces it."""
    if not folder.is_dir():
        return {}
    return {
        prefix + p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != "README.md"
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def push(plan: PushPlan) -> str:
    """Create the repo (and branch) if needed and make one commit; return the commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token

    t = plan.target
    retry = f"Nothing was lost: {plan.root} is complete. Retry with: {retry_command(plan.root, t)}"
    if constants.HF_HUB_OFFLINE:
        raise PushError(f"the push was not sent: HF_HUB_OFFLINE is set, so the Hub cannot be reached. Unset it. {retry}")
    token = get_token()
    if not token:
        raise PushError(f"the push was not sent: there is no Hugging Face token. Set HF_TOKEN or run `hf auth login` (a token with write access). {retry}")
    api = HfApi(token=token)
    message = t.commit_message or f"finetune: {plan.root.name}"

    def commit():
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=source) for path, source in plan.files.items()]
        operations.append(CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=_manifest(plan)))
        operations += [CommitOperationDelete(path_in_repo=path, is_folder=False) for path in plan.deleted]
        return api.create_commit(t.repo_id, operations=operations, commit_message=message, revision=t.revision)

    with redacted_logs():  # huggingface_hub's warnings may quote a server's answer
        try:
            _with_retries(lambda: api.create_repo(t.repo_id, private=t.private, exist_ok=True))
            if t.revision != "main":
                _with_retries(lambda: api.create_branch(t.repo_id, branch=t.revision, exist_ok=True))
            plan.deleted = _with_retries(lambda: read_deleted(api, plan))
            # huggingface_hub already retries the upload requests (preupload, LFS) with its own
            # backoff; only a failed commit request itself is worth repeating here.
            info = _with_retries(commit, only=lambda exc: "/commit/" in _url(exc))
        except Exception as exc:
            raise PushError(redact(f"pushing to {t.repo_id} failed: {_explain(exc, t.repo_id)} {retry}")) from None
    return info.commit_url


def read_deleted(api, plan: PushPlan) -> list[str]:
    """The files the branch's manifest lists (an earlier push put them there) that are still there and that `plan`
    no longer holds: what this push deletes. Empty for a new repo or branch, or one finetune never pushed to."""
    import json
    import tempfile

    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    t = plan.target
    try:
        present = {sibling.rfilename for sibling in api.repo_info(t.repo_id, revision=t.revision).siblings or []}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    if MANIFEST not in present:
        return []
    with tempfile.TemporaryDirectory() as cache:  # a read of one small file: keep it out of the user's Hub cache
        pushed = json.loads(Path(api.hf_hub_download(t.repo_id, MANIFEST, revision=t.revision, cache_dir=cache)).read_text())
    return sorted(set(pushed["files"]) & present - set(plan.files))


def preview_deleted(plan: PushPlan) -> None:
    """For a dry run: read what the push would delete into `plan.deleted`, or why it cannot be known into
    `plan.unread`. Reads the repo, changes nothing."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        plan.unread = "HF_HUB_OFFLINE is set, so the repo was not read"
        return
    token = get_token()
    try:
        with redacted_logs():
            plan.deleted = read_deleted(HfApi(token=token), plan)
    except Exception as exc:
        plan.unread = redact(f"the repo could not be read: {_explain(exc, plan.target.repo_id)}")
        return
    if not token and not plan.deleted:
        plan.unread = "without a token only a public repo can be read"


def _manifest(plan: PushPlan) -> bytes:
    import json

    from finetune import __version__

    manifest = {"finetune": __version__, "files": sorted(plan.files), "artifacts": plan.artifacts}
    return json.dumps(manifest, indent=2).encode() + b"\n"


def download_pushed(repo_id: str, revision: str | None, *, merged: bool) -> tuple[Path, dict]:
    """A repo that `finetune push` wrote, downloaded into the Hub cache with the artifact asked for (the adapter,
    or with `merged` the merged model) and .finetune/: the snapshot's folder and that artifact's manifest entry."""
    import json

    from huggingface_hub import hf_hub_download, snapshot_download

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    with redacted_logs():
        try:
            manifest = json.loads(Path(hf_hub_download(repo_id, MANIFEST, revision=revision)).read_text())
        except Exception as exc:
            raise FinetuneError(redact(f"cannot read {MANIFEST} from the Hub repo {where}: {_explain_download(exc, repo_id)}")) from None
        artifacts = manifest.get("artifacts")
        if not artifacts or RECIPE not in manifest.get("files", []):
            raise FinetuneError(f"{where} was pushed by an earlier finetune version: it holds no {RECIPE}. Use the "
                                "card's snippet, or push the run again with this version.")
        # As for a run directory: the adapter unless --merged; a repo of a merged model alone gives that.
        preferred = [a for a in artifacts if a["adapter"] != merged]
        artifact = preferred[0] if preferred else None if merged else artifacts[0]
        if artifact is None:
            raise FinetuneError(f"--merged: {where} holds the adapter alone (it was pushed without --artifacts merged "
                                "or both). Leave out --merged, or push the run again with --artifacts both.")
        files = [*artifact["files"], RECIPE, SUMMARY]
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
        except Exception as exc:
            raise FinetuneError(redact(f"downloading {where} failed: {_explain_download(exc, repo_id)}")) from None
    # When the Hub cannot list the repo, snapshot_download answers with whatever the cache holds, silently.
    missing = [path for path in files if not (folder / path).is_file()]
    if missing:
        raise FinetuneError(f"downloading {where} failed: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} "
                            "did not arrive (the Hub could not list the repo, or the files were deleted since the push). "
                            "Retry, or predict with the run directory.")
    return folder, artifact


def _explain_download(exc: Exception, repo_id: str) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return "the repo has no such revision. Check --revision."
    if isinstance(exc, LocalEntryNotFoundError):
        return ("the Hub cannot be reached and the file is not in the local cache (HF_HUB_OFFLINE may be set). "
                "Connect, or predict with the run directory.")
    if _status(exc) == 401:
        return f"the Hub does not know {repo_id}, or it is private and needs a token (set HF_TOKEN or run `hf auth login`)."
    return _explain(exc, repo_id)


@dataclass
class TokenAccess:
    """What `finetune check` learns about the push before training: whose token, and whether it may write."""

    user: str | None = None
    role: str | None = None
    """read, write, or fineGrained (scoped permissions)."""
    can_write: bool = False
    problem: str | None = None
    level: str = "error"
    """How bad `problem` is: an error (the push will fail), or a warning (it could not be checked)."""


def token_access(repo_id: str) -> TokenAccess:
    """Ask the Hub who the token belongs to and whether it may write to `repo_id`'s namespace (or the repo)."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        return TokenAccess(problem="HF_HUB_OFFLINE is set, so the token and its write access were not checked; "
                                   "the push at the end of the run will fail unless it is unset.", level="warning")
    token = get_token()
    if not token:
        return TokenAccess(problem="hub.push is on but there is no Hugging Face token: set HF_TOKEN or run "
                                   "`hf auth login` with a write token before the run, or the push will fail after training.")
    try:
        with redacted_logs():
            info = HfApi(token=token).whoami()
    except Exception as exc:
        level = "error" if _status(exc) in (401, 403) else "warning"
        return TokenAccess(problem=redact(f"the Hub could not check the token: {_explain(exc, repo_id)}"), level=level)
    access = info.get("auth", {}).get("accessToken", {})
    namespace = repo_id.split("/")[0]
    role = access.get("role")
    mine = {info.get("name"), *(org.get("name") for org in info.get("orgs", []))}
    if role == "fineGrained":
        scopes = access.get("fineGrained", {}).get("scoped", [])
        can_write = any(scope.get("entity", {}).get("name") in (namespace, repo_id)
                        and "repo.write" in scope.get("permissions", []) for scope in scopes)
    else:
        can_write = role == "write" and namespace in mine
    result = TokenAccess(user=info.get("name"), role=role, can_write=can_write)
    if not can_write:
        why = ("the token is read-only" if role == "read" else
               f"the account {info.get('name')} is neither {namespace} nor a member of it" if namespace not in mine
               else f"its fine-grained permissions do not include repo.write on {namespace}")
        result.problem = (f"hub.repo_id: the token cannot write to {repo_id} ({why}). Use a token with write access "
                          "to that namespace, or push to your own (hub.repo_id: YOUR_NAME/...).")
    return result


def retry_command(root: Path, t: PushTarget) -> str:
    """The command that repeats this push exactly (visibility included: a retry must not make a private model public)."""
    command = f"finetune push {shlex.quote(str(root))} --repo-id {t.repo_id}"
    if t.revision != "main":
        command += f" --revision {shlex.quote(t.revision)}"
    if t.private is not None:
        command += " --private" if t.private else " --public"
    if t.artifacts != "adapter":
        command += f" --artifacts {t.artifacts}"
    command += "".join(f" --include {name}" for name in t.include)
    if t.commit_message:
        command += f" --message {shlex.quote(t.commit_message)}"
    return command


def _with_retries(call, only=lambda exc: True):
    delay = float(os.environ.get(BACKOFF_ENV, "2"))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == ATTEMPTS or not (_transient(exc) and only(exc)):
                raise
            print(redact(f"Hub request failed ({_explain(exc)}); retrying in {delay:g} s ({attempt}/{ATTEMPTS - 1})"), flush=True)
            time.sleep(delay)
            delay *= 2


def _url(exc: Exception) -> str:
    """The URL of the request that failed, for HTTP and transport errors alike."""
    request = getattr(getattr(exc, "response", None), "request", None)
    if request is None:
        try:
            request = getattr(exc, "request", None)  # httpx raises when an error has no request
        except RuntimeError:
            request = None
    return str(getattr(request, "url", ""))


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: Exception) -> bool:
    status = _status(exc)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(exc, _network_errors())


def _network_errors() -> tuple[type[Exception], ...]:
    """Transport errors worth a retry: the network, not a malformed request (huggingface_hub's
    HTTP client is httpx or its fork httpx2, depending on the release)."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        errors += [client.NetworkError, client.TimeoutException, client.RemoteProtocolError]
    return tuple(errors)


def _explain(exc: Exception, repo_id: str = "") -> str:
    from huggingface_hub import constants

    status = _status(exc)
    if status == 401:
        return "the Hub refused the token (401 Unauthorized). Set HF_TOKEN or run `hf auth login` with a valid token."
    if status == 403:
        return (f"the token may not write to {repo_id} (403 Forbidden). Use a token with write access to that "
                "namespace, or push to your own (--repo-id YOUR_NAME/...).")
    if status == 404:
        return f"the Hub does not know {repo_id} or its namespace (404 Not Found). Check --repo-id."
    if status is not None:
        server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        return f"the Hub answered {status}: {server}."
    # Transport errors can quote the request's headers, token included: name the error, not its text.
    if isinstance(exc, _network_errors()):
        return f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}). Check the network connection."
    return f"the request failed ({type(exc).__name__}); check the Hub's status, then retry."


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"
