"""The run directory: where every output of a run lives, and the rules for (re)using one.

    runs/<name>/
      recipe.yaml        the resolved recipe (overrides applied, defaults filled in)
      logs/steps.jsonl   one JSON line per logged step and per evaluation
      logs/tracking/     with track.report_to: TensorBoard's event files, W&B's local files
      logs/trackers.json what continues each tracker's run on --resume (W&B and MLflow run ids)
      checkpoints/       step-N/ folders (model, optimizer, scheduler, RNG, data position)
      model/             the final model, in its ecosystem's format
      model-merged/      LoRA runs with output.merged: the adapter folded into the base model
      metrics.json       final metrics per split, trainable/total parameters, timings
      predictions.json   final predictions and references per split
      example_losses.json  per split, each example's [loss × items, items] (the loss is the ratio of their sums)
      evaluations/       `finetune evaluate`'s results on other data, NAME.json each
      README.md          the model card
      images/            the card's pictures (training curves, confusion matrix ...)
      samples/           what a generator made for the recipe's prompts (text-to-image), for the card
      compare/           `finetune compare`: one run directory per variant, report.md, report.json, images/

Nothing is written until the recipe, plugins and data have been checked: bad input leaves an
existing run directory as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from finetune.errors import FinetuneError
from finetune.files import write_text
from finetune.training.checkpoint import latest_checkpoint


AUTO = "auto"
"""`--resume auto`: resume when there is a checkpoint, start afresh when there is none."""
RESUMABLE = ("train.lr",)
"""Recipe keys a resume may change: the learning rate applies from the checkpoint on (the card says so)."""


class RunLayout:
    def __init__(self, root: Path):
        self.root = root
        self.recipe = root / "recipe.yaml"
        self.steplog = root / "logs" / "steps.jsonl"
        self.tracking = root / "logs" / "tracking"
        self.trackers = root / "logs" / "trackers.json"
        self.checkpoints = root / "checkpoints"
        self.model = root / "model"
        self.merged = root / "model-merged"
        self.metrics = root / "metrics.json"
        self.predictions = root / "predictions.json"
        self.example_losses = root / "example_losses.json"
        self.card = root / "README.md"
        self.images = root / "images"
        self.samples = root / "samples"
        self.evaluations = root / "evaluations"

    def resolve_resume(self, recipe_yaml: str, resume: bool | str, overwrite: bool) -> tuple[bool, bool]:
        """(resume, overwrite) for this start. `--resume auto` resumes when a complete checkpoint exists and
        otherwise starts afresh, replacing a start of the same recipe that stopped before its first checkpoint
        (nothing in it is worth keeping): so a preempted job's command line can be requeued as it is."""
        if resume != AUTO:
            return bool(resume), overwrite
        if latest_checkpoint(self.checkpoints) is not None:
            return True, overwrite
        unfinished_start = self.recipe.is_file() and not self.model.exists() and not self.metrics.exists()
        if unfinished_start and not _changed_keys(_normalised(self.recipe), yaml.safe_load(recipe_yaml)):
            return False, True
        return False, overwrite

    def finished_with(self, recipe_yaml: str) -> bool:
        """Whether this directory holds a finished run of this very recipe (a requeued job that had ended)."""
        return (self.metrics.is_file() and self.model.exists() and self.recipe.is_file()
                and not _changed_keys(_normalised(self.recipe), yaml.safe_load(recipe_yaml)))

    def changed_keys(self, recipe_yaml: str) -> list[str]:
        """The recipe keys in which `recipe_yaml` differs from the recipe this directory's run was started with."""
        return _changed_keys(_normalised(self.recipe), yaml.safe_load(recipe_yaml))

    def check_startable(self, recipe_yaml: str, *, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber a previous run by accident; raise before anything is written."""
        exists = self.root.is_dir() and any(self.root.iterdir())
        if resume:
            if latest_checkpoint(self.checkpoints) is None:
                raise FinetuneError(
                    f"--resume: there is no complete checkpoint in {self.checkpoints}. "
                    "Start the run without --resume (add --overwrite to replace the directory)."
                )
            changed = [k for k in _changed_keys(_normalised(self.recipe), yaml.safe_load(recipe_yaml)) if k not in RESUMABLE]
            if changed:
                raise FinetuneError(
                    f"--resume: the recipe differs from the one {self.root} was started with "
                    f"(changed: {', '.join(changed)}). Resume with the same recipe and overrides (only "
                    f"{', '.join(RESUMABLE)} may change, e.g. after a divergence), or start a new run with another output.dir."
                )
        elif exists and not overwrite:
            raise FinetuneError(
                f"The run directory {self.root} already holds a run. Continue it with --resume, "
                "replace it with --overwrite, or choose another with --set output.dir=PATH."
            )
        elif exists and not self.recipe.is_file():
            raise FinetuneError(
                f"--overwrite: {self.root} is not a finetune run directory (it has no recipe.yaml); "
                "refusing to delete it. Choose another output.dir."
            )

    def begin(self, recipe_yaml: str, *, resume: bool, overwrite: bool) -> None:
        if resume:  # the run directory is already there; its recipe may have a new train.lr
            write_text(self.recipe, recipe_yaml)
            return
        if overwrite and self.root.is_dir():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.recipe, recipe_yaml)


def read_run(root: Path):
    """A finished run, read back from its directory alone (see api.RunRecord)."""
    from finetune.api import RunRecord
    from finetune.training.steplog import read_steplog

    layout = RunLayout(Path(root))
    if not layout.recipe.is_file():
        raise FinetuneError(f"{layout.root} is not a finetune run directory: it has no recipe.yaml.")
    missing = [p.name for p in (layout.metrics, layout.predictions, layout.model) if not p.exists()]
    if missing:
        raise FinetuneError(
            f"{layout.root} holds no finished run ({', '.join(missing)} missing). Finish it first: "
            "`finetune run RECIPE --resume`, with the recipe it was started from, continues from its last checkpoint."
        )
    summary = json.loads(layout.metrics.read_text())
    if "data" not in summary:
        raise FinetuneError(
            f"{layout.root} was made by an earlier finetune version: its metrics.json lacks the data and "
            "environment facts a card needs. Rerun the recipe (with --overwrite) to get a full card."
        )
    recipe = run_recipe(layout.recipe, summary)
    return RunRecord(
        root=layout.root.resolve(),
        recipe=recipe,
        summary=summary,
        predictions=json.loads(layout.predictions.read_text()),
        steps=read_steplog(layout.steplog) if layout.steplog.is_file() else [],
    )


def run_recipe(recipe_file: Path, summary: dict):
    """A run's recipe copy (its directory's, or a pushed repo's), read as the run read its original: relative data
    and model paths meant the original recipe's folder, which metrics.json records."""
    from finetune.recipe import load_recipe

    recipe = load_recipe(recipe_file, cross_check=False)
    recipe._base_dir = Path(summary["data"].get("recipe_dir", recipe.base_dir))
    return recipe


def _normalised(recipe_file: Path) -> dict:
    """A run's recipe copy with today's defaults filled in, so a section added to finetune since
    the run started does not count as a change on --resume."""
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    try:
        return yaml.safe_load(load_recipe(recipe_file, cross_check=False).to_yaml())
    except RecipeError:
        return yaml.safe_load(recipe_file.read_text())


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two recipe mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".") or "recipe"] if old != new else []
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        changed += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
    return changed
