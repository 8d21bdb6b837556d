"""The conformance check for plugin authors, and running recipes inside a test (both exported by
`finetune.testing`): a task plugin, as installed, is put through the contract and a short real
run under each method it declares.

Every problem found is collected and reported at once, each saying which member or file is at
fault; a failing run names the plugin's own line that raised.
"""

from __future__ import annotations

import inspect
import json
import math
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

from finetune import plugins
from finetune.errors import FinetuneError


class ConformanceError(AssertionError):
    """A plugin falls short of the contract; the message lists every problem found."""

    def __init__(self, subject: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{subject} does not conform ({len(problems)} problem{'s' * (len(problems) != 1)}):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_recipe(path: Path, recipe: dict, *, overwrite: bool = True):
    """Write `recipe` to `path`, load it as `finetune run` does and run it in this process;
    return the finetune.pipeline.RunSummary (run_dir, model_dir, card, metrics, parameters)."""
    from finetune.pipeline import run
    from finetune.recipe import load_recipe

    fresh_accelerate_state()
    return run(load_recipe(write_recipe(path, recipe)), overwrite=overwrite)


def fresh_accelerate_state() -> None:
    """Forget the device and precision accelerate fixes once per Python process, so that the next run
    in this process may use others: for test suites (and notebooks) that run several recipes, as
    accelerate's and transformers' own test utilities do. `finetune run` needs none: one run, one process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # accelerate's test-support reset; not public


def check_conformance(recipe: dict, workdir: Path, methods: Sequence[str] | None = None, *,
                      max_steps: int = 2, run_usage: bool = True) -> dict:
    """Check the task plugin `recipe` names, as installed (through its entry point), and return
    the finished runs by method name (finetune.pipeline.RunSummary) for further assertions.

    `recipe` is a small recipe as a dict (tiny model, tiny data); its `method` and `output` are
    replaced. It is run for `max_steps` optimizer steps under each of `methods` (default: the
    methods the task declares, or every installed method when it declares None), with a merged
    copy for adapter methods. Each run must write its model, metrics with a finite loss,
    predictions for the metrics, and a card whose usage snippet runs (`run_usage`) and loads the
    saved model. Raises ConformanceError listing every problem."""
    task_name = recipe["task"]["name"]
    subject = f"the task plugin '{task_name}'"
    task_cls, problems = _static_problems(plugins.TASKS, task_name)
    if task_cls is None:
        raise ConformanceError(subject, problems)
    declared = getattr(task_cls, "methods", None)
    installed_methods = sorted(plugins.available(plugins.METHODS))
    for name in declared or []:
        if name not in installed_methods:
            problems.append(f"Task.methods names '{name}', which is not an installed method (installed: {', '.join(installed_methods)})")
    for name in getattr(task_cls, "default_metrics", []):
        if name not in plugins.available(plugins.METRICS):
            problems.append(
                f"Task.default_metrics names '{name}', which no installed package registers under the "
                f"'{plugins.METRICS}' entry point: it would need the Hugging Face Hub"
            )
    if problems:
        raise ConformanceError(subject, problems)

    runs = {}
    for method in methods or declared or installed_methods:
        method_cls, method_problems = _static_problems(plugins.METHODS, method)
        problems += [f"with {method}: {p}" for p in method_problems]
        if method_cls is None:
            continue
        summary, run_problems = _short_run(recipe, Path(workdir), method, method_cls, max_steps, run_usage)
        problems += [f"with {method}: {p}" for p in run_problems]
        if summary is not None:
            runs[method] = summary
    if problems:
        raise ConformanceError(subject, problems)
    return runs


def _static_problems(group: str, name: str):
    """The plugin class (None when it cannot be loaded) and what is wrong with it without running it."""
    try:
        plugin = plugins.load(group, name)  # the registry's own message lists every missing member
    except FinetuneError as exc:
        return None, [str(exc)]
    problems = []
    options = plugin.Options
    if options.model_config.get("extra") != "forbid":
        problems.append(f"{plugin.__name__}.Options must forbid unknown keys (model_config = ConfigDict(extra=\"forbid\")), "
                        "or a misspelt option in a recipe is silently ignored")
    for field, info in options.model_fields.items():
        if not info.description:
            problems.append(f"{plugin.__name__}.Options.{field} has no description (Field(..., description=...)): "
                            "recipe errors and the docs show it")
    return plugin, problems


def _short_run(recipe: dict, workdir: Path, method: str, method_cls, max_steps: int, run_usage: bool):
    from finetune.card import local_artifacts
    from finetune.rundir import read_run

    adapter = method_cls.produces_adapter
    given = recipe.get("method", {})
    spec = {
        **recipe,
        "method": {"name": method, "options": given.get("options", {}) if given.get("name") == method else {}},
        "train": {**recipe.get("train", {}), "max_steps": max_steps},
        "output": {**recipe.get("output", {}), "dir": str(workdir / "runs" / method), "merged": adapter},
    }
    try:
        summary = run_recipe(workdir / "recipes" / f"{method}.yaml", spec)
    except FinetuneError as exc:
        return None, [f"the short run stopped: {exc}"]
    except Exception as exc:
        return None, [f"the short run failed {_where(exc, plugins.load(plugins.TASKS, recipe['task']['name']), method_cls)}: "
                      f"{type(exc).__name__}: {exc}"]

    problems = []
    metrics = summary.metrics
    for split, values in metrics.items():
        if not math.isfinite(values.get("loss", math.nan)):
            problems.append(f"the {split} loss is {values.get('loss')}: eval_step must return a finite `loss`")
    task_cls = plugins.load(plugins.TASKS, recipe["task"]["name"])
    wants_metrics = bool(recipe.get("eval", {}).get("metrics") or getattr(task_cls, "default_metrics", None))
    if wants_metrics and metrics and all(set(values) == {"loss"} for values in metrics.values()):
        problems.append("eval_step returns no `predictions` and `references`, so no metric was computed")
    predictions = json.loads((summary.run_dir / "predictions.json").read_text())
    for split, saved in predictions.items():
        if len(saved["predictions"]) != len(saved["references"]):
            problems.append(f"eval_step gave {len(saved['predictions'])} predictions but {len(saved['references'])} references on {split}")
    if not any(summary.model_dir.iterdir()):
        problems.append("Task.save wrote nothing into model/")
    if adapter and not (summary.run_dir / "model-merged").is_dir():
        problems.append("no model-merged/ was written: Method.merge or Task.save(adapter=False) failed silently")
    if method == "feature-extraction" and summary.parameters["trainable"] >= summary.parameters["total"]:
        problems.append("every parameter was trained: TaskModel.head must name only the new modules")
    finished = read_run(summary.run_dir)
    if run_usage:
        problems += _usage_problems(finished, local_artifacts(finished))
    problems += _predictor_problems(finished, local_artifacts(finished))
    return summary, problems


def _predictor_problems(run, artifacts) -> list[str]:
    """A task with a `predictor` must predict what its own evaluation predicted, from each saved artifact."""
    from finetune.api import BaseTask
    from finetune.predict import check_round_trip

    if plugins.load(plugins.TASKS, run.recipe.task.name).predictor is BaseTask.predictor:
        return []  # optional: this task does not predict
    if not any(saved["predictions"] for saved in run.predictions.values()):
        return []  # nothing to compare with (named above)
    try:
        problems, warnings = check_round_trip(run, artifacts, limit=8)
    except Exception as exc:
        return [f"Task.predictor failed: {type(exc).__name__}: {exc}"]
    return [f"Task.predictor: {p}" for p in [*problems, *warnings]]


def _usage_problems(run, artifacts) -> list[str]:
    """Run each artifact's card snippet, as a reader of the card would."""
    task_cls = plugins.load(plugins.TASKS, run.recipe.task.name)
    problems = []
    for artifact in artifacts:
        info = task_cls(run.recipe.task_options).card(run, artifact)
        for field in ("pipeline_tag", "library_name", "usage"):
            if not getattr(info, field, None):
                problems.append(f"Task.card gave no `{field}` for {Path(artifact.location).name}/")
        if info.template and not Path(info.template).is_file():
            problems.append(f"Task.card names the template {info.template}, which does not exist")
        try:
            exec(compile(info.usage or "", f"<card usage for {Path(artifact.location).name}/>", "exec"), {})
        except Exception as exc:
            problems.append(f"the card's usage snippet for {Path(artifact.location).name}/ fails: {type(exc).__name__}: {exc}")
    return problems


def _where(exc: BaseException, *plugin_classes) -> str:
    """'in MyTask.collate (my_pkg/task.py:42)': the innermost frame in the plugins' own packages,
    else the innermost frame of finetune's core, else the innermost frame."""
    frames = [(frame.f_code, lineno) for frame, lineno in traceback.walk_tb(exc.__traceback__)]
    core = Path(__file__).parent
    homes = [Path(inspect.getfile(cls)).parent for cls in plugin_classes]

    def under(code, folders) -> bool:
        return any(Path(code.co_filename).is_relative_to(folder) for folder in folders)

    code, lineno = ([f for f in frames if under(f[0], homes)] or [f for f in frames if under(f[0], [core])] or frames)[-1]
    return f"in {code.co_qualname} ({code.co_filename}:{lineno})"
