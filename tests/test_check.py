"""`finetune check`: the report, its exit codes and JSON, the Hub token's write access (against the Hub
double), and `finetune run` stopping on the fast checks' errors before anything is written."""

from __future__ import annotations

import json

from finetune import testing
from hub_double import HubDouble
from test_push import TOKEN, finetune


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
    org = hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, "test-org/tiny")
    theirs = hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, "someone-else/tiny")
    with HubDouble(token=TOKEN) as hub:
        ok = finetune("check", mine, "--json", hub_url=hub.url, home=tmp_path)
        member = finetune("check", org, "--json", hub_url=hub.url, home=tmp_path)
        refused = finetune("check", theirs, "--json", hub_url=hub.url, home=tmp_path)
        no_token = finetune("check", mine, "--json", hub_url=hub.url, home=tmp_path, token=None)
        stopped = finetune("run", theirs, hub_url=hub.url, home=tmp_path)
        assert hub.unmatched == [] and {r.path for r in hub.requests} == {"/api/whoami-v2"}  # read only
    assert hub_section(ok)["facts"] == {"user": "test-user", "role": "write", "can_write": True, "problem": None,
                                        "level": "error"}
    assert hub_section(ok)["findings"] == [] and hub_section(member)["facts"]["can_write"] is True
    assert refused.returncode == 1
    [finding] = hub_section(refused)["findings"]
    assert finding["level"] == "error" and finding["key"] == "hub.repo_id"
    assert ("the token cannot write to someone-else/tiny (the account test-user is neither someone-else nor a member "
            "of it)") in finding["message"]
    assert "there is no Hugging Face token" in hub_section(no_token)["findings"][0]["message"]
    # `finetune run` runs the fast checks first: it stops before loading a model or writing the run directory.
    assert stopped.returncode == 1 and "the token cannot write to someone-else/tiny" in stopped.stderr
    assert not (tmp_path / "run").exists()
    assert TOKEN not in ok.stdout + refused.stdout + stopped.stderr


def test_fine_grained_and_read_only_tokens(tmp_path, pretrained_distilbert, sentiment_dir):
    recipe = hub_recipe(tmp_path, pretrained_distilbert, sentiment_dir, "test-org/tiny")
    scoped = [{"entity": {"type": "org", "name": "test-org"}, "permissions": ["repo.content.read", "repo.write"]}]
    with HubDouble(token=TOKEN, role="fineGrained", scoped=scoped) as hub:
        allowed = hub_section(finetune("check", recipe, "--json", hub_url=hub.url, home=tmp_path))
    with HubDouble(token=TOKEN, role="fineGrained", scoped=[{**scoped[0], "permissions": ["repo.content.read"]}]) as hub:
        denied = hub_section(finetune("check", recipe, "--json", hub_url=hub.url, home=tmp_path))
    with HubDouble(token=TOKEN, role="read") as hub:
        read_only = hub_section(finetune("check", recipe, "--json", hub_url=hub.url, home=tmp_path))
    assert allowed["facts"]["can_write"] is True and allowed["findings"] == []
    assert "do not include repo.write on test-org" in denied["findings"][0]["message"]
    assert "(the token is read-only)" in read_only["findings"][0]["message"]


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
