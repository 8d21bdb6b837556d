"""`finetune check`: the report, its exit codes and JSON, the Hub token's write access (against the Hub
double), and `finetune run` stopping on the fast checks' errors before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from finetune import testing
from hub_double import HubDouble
from test_push import TOKEN, finetune


def token_access(repo_id: str, hub: HubDouble, home, token: str | None = TOKEN) -> dict:
    """`hub.token_access` in a fresh interpreter (huggingface_hub reads HF_ENDPOINT at import), without the rest
    of the check: what the Hub section reports."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home)}
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    code = ("import dataclasses, json, sys; from finetune.hub import token_access; "
            "print(json.dumps(dataclasses.asdict(token_access(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, repo_id: str):
    body = testing.text_recipe(pretrained_distilbert, sentiment_dir, tmp_path / "run", "lora", train={"max_steps": 2},
                               hub={"push": True, "repo_id": repo_id})
    return testing.write_recipe(tmp_path / f"{repo_id.replace('/', '-')}.yaml", body)


def hub_section(result) -> dict:
    report = json.loads(result.stdout)
    return next(s for s in report["sections"] if s["title"] == "Hub push")


def test_the_hub_check_names_the_token_that_cannot_write_before_a_run_trains(tmp_path, pretrained_distilbert,
                                                                             sentiment_dir):
    mine = hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, "test-user/tiny")
    theirs = hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, "someone-else/tiny")
    with HubDouble(token=TOKEN) as hub:
        ok = finetune("check", mine, "--json", hub_url=hub.url, home=tmp_path)
        member = token_access("test-org/tiny", hub, tmp_path)
        refused = finetune("check", theirs, "--json", hub_url=hub.url, home=tmp_path)
        no_token = token_access("test-user/tiny", hub, tmp_path, token=None)
        stopped = finetune("run", theirs, hub_url=hub.url, home=tmp_path)
        assert hub.unmatched == [] and {r.path for r in hub.requests} == {"/api/whoami-v2"}  # read only
    assert hub_section(ok)["facts"] == {"user": "test-user", "role": "write", "can_write": True, "problem": None,
                                        "level": "error"}
    assert hub_section(ok)["findings"] == [] and member["can_write"] is True  # an organisation the user belongs to
    assert refused.returncode == 1
    [finding] = hub_section(refused)["findings"]
    assert finding["level"] == "error" and finding["key"] == "hub.repo_id"
    assert ("the token cannot write to someone-else/tiny (the account test-user is neither someone-else nor a member "
            "of it)") in finding["message"]
    assert "there is no Hugging Face token" in no_token["problem"] and no_token["level"] == "error"
    # `finetune run` runs the fast checks first: it stops before loading a model or writing the run directory.
    assert stopped.returncode == 1 and "the token cannot write to someone-else/tiny" in stopped.stderr
    assert not (tmp_path / "run").exists()
    assert TOKEN not in ok.stdout + refused.stdout + stopped.stderr


def test_fine_grained_and_read_only_tokens(tmp_path):
    scoped = [{"entity": {"type": "org", "name": "test-org"}, "permissions": ["repo.content.read", "repo.write"]}]
    with HubDouble(token=TOKEN, role="fineGrained", scoped=scoped) as hub:
        allowed = token_access("test-org/tiny", hub, tmp_path)
    with HubDouble(token=TOKEN, role="fineGrained", scoped=[{**scoped[0], "permissions": ["repo.content.read"]}]) as hub:
        denied = token_access("test-org/tiny", hub, tmp_path)
    with HubDouble(token=TOKEN, role="read") as hub:
        read_only = token_access("test-org/tiny", hub, tmp_path)
    assert allowed["can_write"] is True and allowed["problem"] is None
    assert denied["can_write"] is False and "do not include repo.write on test-org" in denied["problem"]
    assert read_only["can_write"] is False and "(the token is read-only)" in read_only["problem"]


def test_check_on_every_shipped_recipe_works_offline_or_names_what_needs_the_hub():
    """Offline (the test environment): the quickstart is checked in full and clean; a recipe whose data or model
    lives on the Hub is not failed for it: each section it cannot check says what needs the Hub."""
    from pathlib import Path

    from finetune.checks import WARNINGS_ONLY, run_checks
    from finetune.recipe import load_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        report = run_checks(load_recipe(path), recipe_name=path.name)
        errors = [f.message for f in report.findings if f.level == "error"]
        assert errors == [], (path.name, errors)
        if path.name == "quickstart.yaml":
            assert report.exit_code == 0 and not any(s.skipped for s in report.sections if s.title != "Hub push")
            [data] = [s for s in report.sections if s.title == "Data"]
            assert [row[:2] for row in data.rows] == [["train", 648], ["eval", 72], ["test", 200]]
            continue
        assert report.exit_code == WARNINGS_ONLY, path.name
        hub_only = [s for s in report.sections if s.skipped and "Hub" in s.skipped and s.title != "Hub push"]
        assert {s.title for s in hub_only} >= {"Data", "Memory per method"}, (path.name, [s.skipped for s in report.sections])
        assert all("needs the Hugging Face Hub" in s.skipped or "it needs the Hub" in s.skipped for s in hub_only)
