"""Pushing to the Hub, against a local HTTP double of it (tests/hub_double.py) that records
every request: what one commit holds, the card that arrives, visibility, re-pushes, failures
that lose nothing, retries, and the token never leaving the Authorization header.

The CLI runs in a subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from finetune import testing
from finetune.cli import main
from finetune.hub import MANIFEST, RECIPE, SUMMARY, PushTarget, prepare_push
from hub_double import HubDouble

TOKEN = "hf_test_secret"
REPO = "test-user/tiny-sentiment"


def finetune(*args, hub_url: str, token: str | None = TOKEN, home: Path, timeout: int = 300):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),  # no token stored by an earlier `hf auth login` on this machine
        "FINETUNE_PUSH_BACKOFF": "0.05",
    }
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_card_snippets(card_text: str, repo_files: dict[str, bytes], mirror: Path) -> None:
    """Run the pushed card's snippets against a local copy of what the commit holds."""
    for path, data in repo_files.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(data)
    snippets = re.findall(r"```python\n(.*?)```", card_text, re.S)
    assert snippets
    for snippet in snippets:
        assert f'"{REPO}"' in snippet
        printed = []
        exec(snippet.replace(f'"{REPO}"', f'"{mirror}"'), {"print": lambda *a: printed.append(" ".join(map(str, a)))})
        assert len(printed) == 1 and ("negative" in printed[0] or "positive" in printed[0])


def assert_token_only_in_auth_header(hub: HubDouble, *texts: str) -> None:
    for request in hub.requests:
        assert TOKEN not in request.path + request.query
        assert TOKEN.encode() not in request.body
        assert all(TOKEN not in value for name, value in request.headers.items() if name != "authorization")
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    for text in texts:
        assert TOKEN not in text


def test_push_makes_one_commit_with_model_card_and_images(lora_run, tmp_path):
    before = snapshot(lora_run)
    with HubDouble(token=TOKEN) as hub:
        result = finetune("push", lora_run, "--repo-id", REPO, "--private", "--artifacts", "both",
                          hub_url=hub.url, home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"pushed: {hub.url}/{REPO}/commit/" in result.stdout
        assert hub.unmatched == []  # every request was one the real Hub serves
        repo = hub.repos[REPO]
        files = hub.files(REPO)
        assert_token_only_in_auth_header(hub, result.stdout, result.stderr, *(f.decode("latin-1") for f in files.values()))

    assert repo.private is True and len(repo.commits) == 1
    # "both": the merged model at the root, the adapter in adapter/. peft writes a stub README.md
    # into model/: the repo's README.md is finetune's card instead.
    merged = {f"{p.relative_to(lora_run / 'model-merged')}": p for p in (lora_run / "model-merged").rglob("*") if p.is_file()}
    model = {f"adapter/{p.relative_to(lora_run / 'model')}": p for p in (lora_run / "model").rglob("*")
             if p.is_file() and p.name != "README.md"}
    images = {f"images/{p.name}": p for p in (lora_run / "images").iterdir()}
    assert set(files) == {"README.md", MANIFEST, RECIPE, SUMMARY, *model, *merged, *images}
    assert sorted(__import__("json").loads(files[MANIFEST])["files"]) == sorted(set(files) - {MANIFEST})
    assert "adapter/adapter_model.safetensors" in files and "model.safetensors" in files
    for path, local in {**model, **merged, **images}.items():
        assert files[path] == local.read_bytes(), path
    assert files[RECIPE] == (lora_run / "recipe.yaml").read_bytes() and files[SUMMARY] == (lora_run / "metrics.json").read_bytes()
    assert not any(p.startswith(("checkpoints/", "logs/")) or p in ("metrics.json", "predictions.json") for p in files)

    # The card that arrived: Hub metadata and eval results, and snippets that load the repo.
    card_path = tmp_path / "pushed.md"
    card_path.write_bytes(files["README.md"])
    card = ModelCard.load(card_path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.license == "apache-2.0" and "lora" in card.data.tags
    summary = __import__("json").loads((lora_run / "metrics.json").read_text())
    pushed = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert pushed[("test.jsonl", "accuracy")] == summary["metrics"]["test"]["accuracy"]

    # The snippets load the repo's layout: run them on a local copy of what was committed.
    merged_snippet, adapter_snippet = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert f'model="{REPO}"' in merged_snippet and f'"{REPO}", subfolder="adapter"' in adapter_snippet
    assert str(lora_run) not in adapter_snippet + merged_snippet
    run_card_snippets(card.text, files, tmp_path / "mirror")

    assert snapshot(lora_run) == before  # the push changed nothing in the run directory


def test_repush_to_an_existing_repo_and_branch_with_logs(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        first = finetune("push", lora_run, "--repo-id", REPO, "--private", hub_url=hub.url, home=tmp_path)
        assert first.returncode == 0, first.stderr
        adapter_repo = hub.files(REPO)  # the default: the adapter at the root, with its own snippet
        assert "adapter_model.safetensors" in adapter_repo and "config.json" not in adapter_repo
        run_card_snippets(adapter_repo["README.md"].decode(), adapter_repo, tmp_path / "mirror")
        again = finetune("push", lora_run, "--repo-id", REPO, "--public", "--include", "logs", "--include", "metrics",
                         "--revision", "experiment", hub_url=hub.url, home=tmp_path)
        assert again.returncode == 0, again.stderr
        repo = hub.repos[REPO]
        assert repo.private is True  # an existing repo keeps its visibility
        assert [c.revision for c in repo.commits] == ["main", "experiment"]
        branch = hub.files(REPO, "experiment")
        assert branch["logs/steps.jsonl"] == (lora_run / "logs/steps.jsonl").read_bytes()
        assert "metrics.json" in branch and "predictions.json" in branch
        assert "logs/steps.jsonl" not in hub.files(REPO, "main")
        assert_token_only_in_auth_header(hub, again.stdout, again.stderr)


def test_include_logs_takes_the_step_log_and_tensorboard_files_but_not_other_trackers_files(lora_run, tmp_path):
    run = shutil.copytree(lora_run, tmp_path / "run")
    tracking = run / "logs" / "tracking"
    for path in ("tiny/events.out.tfevents.1.vm.1.0", "tiny/17.5/hparams.yml", "wandb/run-1/files/config.yaml"):
        (tracking / path).parent.mkdir(parents=True, exist_ok=True)
        (tracking / path).write_text("x")
    (run / "logs" / "trackers.json").write_text("{}")
    plan = prepare_push(run, PushTarget(REPO, include=["logs"]))
    assert sorted(p for p in plan.files if p.startswith("logs/")) == [
        "logs/steps.jsonl", "logs/tracking/tiny/17.5/hparams.yml", "logs/tracking/tiny/events.out.tfevents.1.vm.1.0"]


def test_predict_from_the_hub_repo_gives_the_runs_own_predictions(lora_run, sentiment_dir, tmp_path):
    """`finetune predict REPO_ID`: the adapter (default) and the merged model, downloaded from what a push wrote."""
    expected = json.loads((lora_run / "predictions.json").read_text())["test"]["predictions"]
    with HubDouble(token=TOKEN) as hub:
        pushed = finetune("push", lora_run, "--repo-id", REPO, "--artifacts", "both", hub_url=hub.url, home=tmp_path)
        assert pushed.returncode == 0, pushed.stderr
        for artifact in ([], ["--merged"]):
            out = tmp_path / f"out{len(artifact)}.jsonl"
            result = finetune("predict", REPO, "--input-file", sentiment_dir / "test.jsonl", "-o", out, *artifact,
                              hub_url=hub.url, home=tmp_path)
            assert result.returncode == 0, result.stderr
            assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()] == expected
        downloaded = {p.name for p in (tmp_path / "hub").rglob("*") if p.is_file() and "snapshots" in p.parts}
        assert "adapter_model.safetensors" in downloaded and "pushed.json" in downloaded
        assert not any(name.endswith(".png") for name in downloaded)  # only the artifact asked for and .finetune/
        missing = finetune("predict", "test-user/nothing-here", "good", hub_url=hub.url, home=tmp_path)
        assert hub.unmatched == []
        # The Hub cannot list the repo: snapshot_download falls back to the cache (here: the manifest alone).
        hub.fail_next("GET", r"/tree/", 404)
        unlisted = finetune("predict", REPO, "good", hub_url=hub.url, home=tmp_path / "fresh")
    assert unlisted.returncode == 1 and "did not arrive (the Hub could not list the repo" in unlisted.stderr
    assert missing.returncode == 1
    assert "cannot read .finetune/pushed.json from the Hub repo test-user/nothing-here" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_dry_run_lists_files_and_metadata_and_changes_nothing(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        result = finetune("push", lora_run, "--repo-id", REPO, "--dry-run", hub_url=hub.url, home=tmp_path, token=None)
        assert result.returncode == 0, result.stderr
        assert {r.method for r in hub.requests} <= {"GET"} and hub.repos == {}  # it only tried to read the manifest
    assert "that this one would delete: unknown (the repo could not be read" in result.stdout
    assert f"Would push 9 files to {REPO} (branch main, new repo: the account's default)" in result.stdout
    assert "adapter_model.safetensors" in result.stdout and "images/training-curves.png" in result.stdout
    assert "library_name: peft" in result.stdout and "model-index:" in result.stdout


def test_repush_deletes_what_the_earlier_push_put_there_and_keeps_files_added_by_hand(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        assert finetune("push", lora_run, "--repo-id", REPO, hub_url=hub.url, home=tmp_path).returncode == 0
        hub.commit_files(REPO, {"notes.md": b"written by hand", "eval/extra.json": b"{}"})
        preview = finetune("push", lora_run, "--repo-id", REPO, "--artifacts", "merged", "--dry-run",
                           hub_url=hub.url, home=tmp_path)
        assert preview.returncode == 0, preview.stderr
        assert len(hub.repos[REPO].commits) == 2  # the dry run read the repo, changed nothing
        again = finetune("push", lora_run, "--repo-id", REPO, "--artifacts", "merged", hub_url=hub.url, home=tmp_path)
        assert again.returncode == 0, again.stderr
        assert hub.unmatched == []
        files, commits = hub.files(REPO), hub.repos[REPO].commits

    adapter_only = {"adapter_config.json", "adapter_model.safetensors"}  # the tokenizer files are in both artifacts
    assert len(commits) == 3 and set(commits[-1].deleted) == adapter_only  # one commit adds and deletes
    assert "Would delete 2 files an earlier push put there that this one drops:" in preview.stdout
    assert all(f"  {path}" in preview.stdout for path in adapter_only)
    assert f"deleted 2 files an earlier push put there: {', '.join(sorted(adapter_only))}" in again.stdout
    assert not adapter_only & set(files) and files["model.safetensors"] == (lora_run / "model-merged/model.safetensors").read_bytes()
    assert files["notes.md"] == b"written by hand" and files["eval/extra.json"] == b"{}"  # no push put them there
    assert "notes.md" not in __import__("json").loads(files[MANIFEST])["files"]


def test_refused_token_fails_clearly_and_loses_nothing(lora_run, tmp_path):
    before = snapshot(lora_run)
    with HubDouble(token=TOKEN) as hub:
        result = finetune("push", lora_run, "--repo-id", REPO, "--private", hub_url=hub.url, home=tmp_path,
                          token="hf_wrong_token")
        assert REPO not in hub.repos
    assert result.returncode == 1
    assert "the Hub refused the token (401 Unauthorized)" in result.stderr
    # The retry keeps the visibility: it must not create the repo public.
    assert f"Nothing was lost: {lora_run} is complete. Retry with: finetune push {lora_run} --repo-id {REPO} --private" in result.stderr
    assert "hf_wrong_token" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert snapshot(lora_run) == before


def test_a_malformed_token_is_not_echoed_nor_retried(lora_run, tmp_path):
    # The HTTP client rejects a header with a control character and quotes it in its error.
    with HubDouble(token=TOKEN) as hub:
        result = finetune("push", lora_run, "--repo-id", REPO, hub_url=hub.url, home=tmp_path, token="hf_bad\x0bsecret")
    assert result.returncode == 1 and "retrying" not in result.stdout
    assert "secret" not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_a_server_that_echoes_the_request_headers_never_shows_the_token(lora_run, tmp_path):
    token = "hf_" + "Q7xK2mW9pL4vN8rT" * 2 + "zZ"  # shaped like a real one
    with HubDouble(token=token) as hub:
        hub.fail_next("POST", r"/commit/main$", 500, times=4, echo_headers=True)  # a proxy quoting the request
        result = finetune("push", lora_run, "--repo-id", REPO, hub_url=hub.url, home=tmp_path, token=token)
    shown = result.stdout + result.stderr
    assert result.returncode == 1 and result.stdout.count("retrying in") == 3
    assert "authorization: Bearer ***" in shown  # the echo reached the user, masked
    assert token not in shown and token[3:] not in shown and "Traceback" not in shown
    assert not [p for p in lora_run.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_forbidden_namespace_fails_clearly(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        hub.fail_next("POST", r"^/api/repos/create$", 403)
        result = finetune("push", lora_run, "--repo-id", "someone-else/model", hub_url=hub.url, home=tmp_path)
    assert result.returncode == 1
    assert "the token may not write to someone-else/model (403 Forbidden)" in result.stderr


def test_network_down_is_retried_then_fails_with_the_retry_command(lora_run, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = finetune("push", lora_run, "--repo-id", REPO, hub_url=closed, home=tmp_path)
    assert result.returncode == 1
    assert result.stdout.count("retrying in") == 3
    assert f"cannot reach {closed}" in result.stderr and f"finetune push {lora_run} --repo-id {REPO}" in result.stderr


def test_transient_server_errors_are_retried(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        hub.fail_next("POST", r"^/api/repos/create$", 503, times=2)
        hub.fail_next("POST", r"/commit/main$", 502)
        result = finetune("push", lora_run, "--repo-id", REPO, hub_url=hub.url, home=tmp_path)
        assert result.returncode == 0, result.stderr
        creates = [r for r in hub.requests if r.path == "/api/repos/create"]
        commits = [r for r in hub.requests if r.path.endswith("/commit/main")]
        assert len(creates) == 3 and len(commits) == 2 and len(hub.repos[REPO].commits) == 1
    assert result.stdout.count("retrying in") == 3


def test_invalid_repo_id_and_missing_token_send_nothing(lora_run, tmp_path):
    with HubDouble(token=TOKEN) as hub:
        bad = finetune("push", lora_run, "--repo-id", "not a repo", hub_url=hub.url, home=tmp_path)
        no_token = finetune("push", lora_run, "--repo-id", REPO, hub_url=hub.url, home=tmp_path, token=None)
        assert hub.requests == []
    assert bad.returncode == 1 and "--repo-id 'not a repo' is not a valid Hub repo id" in bad.stderr
    assert no_token.returncode == 1 and "there is no Hugging Face token. Set HF_TOKEN or run `hf auth login`" in no_token.stderr


def test_run_with_hub_push_trains_and_pushes_or_reports_trained(tmp_path, pretrained_distilbert, sentiment_dir):
    def recipe(name: str) -> Path:
        body = testing.text_recipe(pretrained_distilbert, sentiment_dir, tmp_path / name, "full", train={"epochs": 1},
                                   hub={"push": True, "repo_id": f"test-user/{name}", "private": True})
        return testing.write_recipe(tmp_path / f"{name}.yaml", body)

    with HubDouble(token=TOKEN) as hub:
        ok = finetune("run", recipe("pushed"), hub_url=hub.url, home=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert "config.json" in hub.files("test-user/pushed") and hub.repos["test-user/pushed"].private

        # The token passes the check before training (whoami: write) but the Hub refuses the repo afterwards.
        hub.fail_next("POST", r"^/api/repos/create$", 403)
        failed = finetune("run", recipe("refused"), hub_url=hub.url, home=tmp_path)
    assert failed.returncode == 3, failed.stderr
    assert "test: loss" in failed.stdout  # the run's own summary
    assert "The run is trained and saved, but the push did not happen: pushing to test-user/refused failed" in failed.stderr
    assert f"Retry with: finetune push {tmp_path / 'refused'} --repo-id test-user/refused --private" in failed.stderr
    assert (tmp_path / "refused" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "refused" / "README.md").is_file()


def test_recipe_refuses_a_token_and_a_push_without_repo(tmp_path, sentiment_dir, distilbert_dir):
    body = testing.text_recipe(distilbert_dir, sentiment_dir, tmp_path / "run", "full",
                               hub={"push": True, "token": "hf_secret_in_recipe"})
    result = CliRunner().invoke(main, ["validate", str(testing.write_recipe(tmp_path / "r.yaml", body))])
    assert result.exit_code == 1
    assert "hub.token: unknown key" in result.output and "never write a token into a recipe" in result.output
    assert "hf_secret_in_recipe" not in result.output

    body["hub"] = {"push": True}
    result = CliRunner().invoke(main, ["validate", str(testing.write_recipe(tmp_path / "r.yaml", body))])
    assert result.exit_code == 1 and "hub: push is true but repo_id is missing; set hub.repo_id: user/name" in result.output


@pytest.mark.slow
def test_two_process_run_pushes_once_after_both_ranks_finish(tmp_path, pretrained_distilbert, sentiment_dir):
    body = testing.text_recipe(pretrained_distilbert, sentiment_dir, tmp_path / "run", "full", train={"max_steps": 4},
                               hub={"push": True, "repo_id": REPO})
    with HubDouble(token=TOKEN) as hub:
        result = finetune("run", testing.write_recipe(tmp_path / "r.yaml", body), "--processes", "2",
                          hub_url=hub.url, home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(hub.repos[REPO].commits) == 1
        assert len([r for r in hub.requests if r.path == "/api/repos/create"]) == 1
    assert result.stdout.count("pushed: ") == 1
