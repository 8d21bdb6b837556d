"""Plugins through entry points: the built-ins, and broken third-party ones reported clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import testing

REPO = Path(__file__).resolve().parent.parent

HALF_TASK = '''
from pydantic import BaseModel

class HalfTask:
    """Has options and data preparation, nothing else."""
    Options = BaseModel
    def prepare_data(self, splits):
        return splits

def make_task():
    return HalfTask
'''


@pytest.fixture
def broken_site(tmp_path) -> Path:
    """An installed distribution with four broken task plugins (a dist-info folder on the path)."""
    return testing.write_distribution(
        tmp_path / "site", "broken-plugins", "1.2",
        {"finetune.tasks": {
            "half-task": "broken_pkg.half:HalfTask",
            "crashing-task": "broken_pkg.crash:Task",
            "function-task": "broken_pkg.half:make_task",
            "missing-target": "broken_pkg.half:NoSuchClass",
        }},
        {"broken_pkg/__init__.py": "", "broken_pkg/half.py": HALF_TASK,
         "broken_pkg/crash.py": "raise ImportError(\"No module named 'some_missing_dependency'\")\n"},
    )


def finetune_cli(*args, site: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site) if site else ""}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_builtins_are_listed_with_their_distribution():
    out = finetune_cli("plugins")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    builtins = [("task", "text-classification"), ("task", "image-classification"), ("method", "feature-extraction"),
                ("method", "full"), ("method", "lora"), ("metric", "accuracy"), ("metric", "top5_accuracy")]
    for kind, name in builtins:
        assert any(line.split()[:3] == [kind, name, "finetune"] and line.split()[-1] == "ok" for line in lines), out.stdout


def test_broken_plugins_are_reported_and_do_not_break_other_commands(broken_site):
    out = finetune_cli("plugins", site=broken_site)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "task    crashing-task            broken-plugins 1.2        FAILED" in text
    assert (
        "the task 'crashing-task' from the distribution 'broken-plugins 1.2' failed to import "
        "(broken_pkg.crash:Task): ImportError: No module named 'some_missing_dependency'" in text
    )
    assert (
        "the task 'half-task' from the distribution 'broken-plugins 1.2' (broken_pkg.half:HalfTask) does not meet the "
        "task contract: missing member 'methods'; missing member 'default_metrics'; missing member 'stratify_column'; "
        "missing member 'build_model'; missing member 'preprocess'; missing member 'collate'; missing member "
        "'training_step'; missing member 'eval_step'; missing member 'save'; missing member 'card'" in text
    )
    assert "the entry point must name a class, not function" in text
    assert "the task 'missing-target' from the distribution 'broken-plugins 1.2' failed to import" in text
    assert "AttributeError" in text
    # The built-ins still load, and a recipe that needs none of the broken plugins still validates.
    assert "task    text-classification      finetune" in text
    assert finetune_cli("validate", "recipes/quickstart.yaml", site=broken_site).returncode == 0


def test_a_recipe_naming_a_broken_plugin_gets_its_reason(broken_site):
    out = finetune_cli("validate", "recipes/quickstart.yaml", "--set", "task.name=crashing-task", site=broken_site)
    assert out.returncode == 1
    assert "task.name: the task 'crashing-task' from the distribution 'broken-plugins 1.2' failed to import" in out.stderr
    assert "Traceback" not in out.stderr


EXAMPLE = REPO / "plugins" / "finetune-token-classification"


def test_the_example_plugin_is_listed_until_uninstalled():
    """`finetune plugins` shows what is installed now: the example plugin goes with `pip uninstall`,
    and recipes naming it get the registry's message. It is reinstalled as the test command installed it."""

    def listed() -> list[list[str]]:
        out = finetune_cli("plugins").stdout
        return [line.split() for line in out.splitlines() if "finetune-token-classification" in line]

    installed = [["task", "token-classification", "finetune-token-classification", "0.1.0", "ok"],
                 ["metric", "entities", "finetune-token-classification", "0.1.0", "ok"]]
    assert listed() == installed, "the README's test command installs plugins/finetune-token-classification first"
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run([*pip, "uninstall", "--yes", "finetune-token-classification"], check=True)
    try:
        assert listed() == []
        out = finetune_cli("validate", str(EXAMPLE / "recipes" / "tiny-ner.yaml"))
        assert out.returncode == 1
        assert "task.name: unknown task 'token-classification'. Did you mean 'text-classification'?" in out.stderr
    finally:
        subprocess.run([*pip, "install", "--no-deps", "--editable", str(EXAMPLE)], check=True)
    assert listed() == installed


def test_a_plugin_that_inherits_no_base_class_gets_the_optional_defaults():
    import torch
    from pydantic import BaseModel

    from finetune.api import OPTIONAL, BaseMethod, BaseTask, check_plugin, with_defaults
    from finetune.tasks.text_classification import TextClassification

    def member(self, *args, **kwargs):
        return None

    class BareTask:  # every required member, no optional one, no base class
        Options, methods, default_metrics, stratify_column = BaseModel, None, [], None
        prepare_data = build_model = preprocess = collate = training_step = eval_step = save = card = member

        def __init__(self, options):
            self.options = options

    assert set(OPTIONAL["task"]) == {"data_facts", "count_items", "metric_options", "write_samples",
                                     "enable_gradient_checkpointing", "predictor", "load_saved", "export_inputs", "build_skeleton",
                                     "audit_input", "audit_label"}
    assert check_plugin(BareTask, "task") == []
    loaded = with_defaults(BareTask, "task")
    assert loaded.__name__ == "BareTask" and loaded.__module__ == __name__ and issubclass(loaded, (BareTask, BaseTask))
    task = loaded(None)
    assert task.count_items({"input_ids": torch.zeros(3, 5)}).tolist() == [1.0, 1.0, 1.0]
    assert task.data_facts() == {} and task.metric_options() == {} and task.write_samples(None, None) is None
    assert task.predictor(None, None, None) is None  # the task does not predict
    assert task.enable_gradient_checkpointing(torch.nn.Linear(2, 2)) == []  # no ecosystem switch in a bare module
    assert with_defaults(TextClassification, "task") is TextClassification  # a subclass of the base stays itself

    class Counting(BareTask):  # an optional member the plugin gives wins over the default
        def count_items(self, batch):
            return torch.full((2,), 7)

    assert with_defaults(Counting, "task")(None).count_items({}).tolist() == [7, 7]

    class NotCallable(BareTask):
        count_items = 3

    assert check_plugin(NotCallable, "task") == ["'count_items' must be a method"]

    class BareMethod:
        Options, produces_adapter = BaseModel, False
        prepare = merge = member

        def __init__(self, options):
            pass

    assert check_plugin(BareMethod, "method") == []
    method = with_defaults(BareMethod, "method")(None)
    linear = torch.nn.Linear(2, 2)
    linear.bias.requires_grad_(False)
    assert isinstance(method, BaseMethod) and method.title == "a fine-tune" and method.frozen_modules(linear) == []
    assert [g["params"] for g in method.parameter_groups(linear)] == [[linear.weight]]
