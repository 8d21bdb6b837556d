"""finetune.testing.check_conformance: a conforming task passes under every method; each kind of
defect is named precisely, all at once."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from finetune import plugins, testing

DEFECTIVE = '''
from pydantic import BaseModel
from finetune.tasks.text_classification import TextClassification


class LooseOptions(BaseModel):
    max_length: int = 32


class Sloppy(TextClassification):
    Options = LooseOptions
    methods = ("full", "no-such-method")
    default_metrics = ["accuracy", "bleu"]


class CrashingCollate(TextClassification):
    methods = ("full",)

    def collate(self, examples):
        return {"input_ids": examples["input_ids"]}


class SilentEval(TextClassification):
    methods = ("full",)

    def eval_step(self, model, batch):
        return {"loss": super().eval_step(model, batch)["loss"]}


class BatchMeanEvalLoss(TextClassification):
    methods = ("full",)

    def eval_step(self, model, batch):
        return {**super().eval_step(model, batch), "loss": model(**batch).loss}


class SwappedPredictor(TextClassification):
    methods = ("full",)

    def predictor(self, run, artifact, options):
        predictor = super().predictor(run, artifact, options)
        predict = predictor.predict
        predictor.predict = lambda inputs: [{**r, "prediction": 1 - r["prediction"]} for r in predict(inputs)]
        return predictor


class Half:
    Options = LooseOptions
'''


@pytest.fixture
def defective_site(tmp_path, monkeypatch):
    """An installed distribution whose task plugins each have one kind of defect."""
    site = testing.write_distribution(
        tmp_path / "site", "defective-plugins", "0.3",
        {"finetune.tasks": {
            "sloppy": "defective_pkg.tasks:Sloppy",
            "crashing-collate": "defective_pkg.tasks:CrashingCollate",
            "silent-eval": "defective_pkg.tasks:SilentEval",
            "batch-mean-eval-loss": "defective_pkg.tasks:BatchMeanEvalLoss",
            "half": "defective_pkg.tasks:Half",
            "swapped-predictor": "defective_pkg.tasks:SwappedPredictor",
        }},
        {"defective_pkg/__init__.py": "", "defective_pkg/tasks.py": DEFECTIVE},
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    plugins.load.cache_clear()
    yield site
    plugins.load.cache_clear()
    for name in [n for n in sys.modules if n.startswith("defective_pkg")]:
        del sys.modules[name]  # each test's package lives in its own tmp folder


def recipe_for(task: str, distilbert_dir, sentiment_dir, tmp_path) -> dict:
    recipe = testing.text_recipe(distilbert_dir, sentiment_dir, tmp_path / "unused")
    recipe["task"]["name"] = task
    return recipe


def problems_of(task: str, distilbert_dir, sentiment_dir, tmp_path) -> list[str]:
    with pytest.raises(testing.ConformanceError) as caught:
        testing.check_conformance(recipe_for(task, distilbert_dir, sentiment_dir, tmp_path), tmp_path / "check")
    assert str(caught.value).startswith(f"the task plugin '{task}' does not conform ({len(caught.value.problems)} problem")
    return caught.value.problems


def test_the_builtin_text_task_conforms_under_every_method(distilbert_dir, sentiment_dir, tmp_path):
    runs = testing.check_conformance(recipe_for("text-classification", distilbert_dir, sentiment_dir, tmp_path), tmp_path / "check")
    assert sorted(runs) == ["feature-extraction", "full", "lora"]
    assert (runs["lora"].run_dir / "model-merged" / "config.json").is_file()  # adapter methods also merge
    assert all(summary.metrics["eval"]["loss"] > 0 for summary in runs.values())


def test_every_static_defect_is_listed_at_once(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    assert problems_of("sloppy", distilbert_dir, sentiment_dir, tmp_path) == [
        'Sloppy.Options must forbid unknown keys (model_config = ConfigDict(extra="forbid")), or a misspelt option '
        "in a recipe is silently ignored",
        "Sloppy.Options.max_length has no description (Field(..., description=...)): recipe errors and the docs show it",
        "Task.methods names 'no-such-method', which is not an installed method (installed: feature-extraction, full, lora)",
        "Task.default_metrics names 'bleu', which no installed package registers under the 'finetune.metrics' entry "
        "point: it would need the Hugging Face Hub",
    ]
    assert not (tmp_path / "check").exists()  # nothing is run when the plugin is wrong before running


def test_missing_members_are_all_named(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    (problem,) = problems_of("half", distilbert_dir, sentiment_dir, tmp_path)
    assert problem.startswith("the task 'half' from the distribution 'defective-plugins 0.3' (defective_pkg.tasks:Half) "
                              "does not meet the task contract: missing member 'methods'; missing member 'default_metrics';")
    assert problem.endswith("missing member 'save'; missing member 'card'")


def test_a_crash_names_the_plugins_own_line(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    (problem,) = problems_of("crashing-collate", distilbert_dir, sentiment_dir, tmp_path)
    source = defective_site / "defective_pkg" / "tasks.py"
    line = DEFECTIVE.splitlines().index('        return {"input_ids": examples["input_ids"]}') + 1
    assert problem == (f"with full: the short run failed in CrashingCollate.collate ({source}:{line}): "
                       "TypeError: list indices must be integers or slices, not str")


def test_an_eval_step_without_predictions_is_named(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    assert problems_of("silent-eval", distilbert_dir, sentiment_dir, tmp_path) == [
        "with full: eval_step returns no `predictions` and `references`, so no metric was computed"
    ]


def test_an_eval_loss_that_is_a_batch_mean_is_named(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    # A batch mean cannot be corrected for the examples that several processes repeat on the last batch.
    assert problems_of("batch-mean-eval-loss", distilbert_dir, sentiment_dir, tmp_path) == [
        "with full: the short run stopped: eval_step returned a loss of shape () for a batch of 16 examples; it must "
        "return one loss per example (e.g. F.cross_entropy(logits, labels, reduction='none')), so that evaluation under "
        "several processes can drop the examples repeated to fill the last batch."
    ]


def test_a_broken_card_snippet_is_named(defective_site, distilbert_dir, sentiment_dir, tmp_path, monkeypatch):
    from finetune.tasks import text_classification

    monkeypatch.setattr(text_classification, "_usage", lambda artifact, labels: "import no_such_module\n")
    problems = problems_of("text-classification", distilbert_dir, sentiment_dir, tmp_path)
    assert problems[0] == ("with feature-extraction: the card's usage snippet for model/ fails: "
                           "ModuleNotFoundError: No module named 'no_such_module'")
    assert any(re.fullmatch(r"with lora: the card's usage snippet for model-merged/ fails: .*", p) for p in problems)


def test_a_predictor_that_disagrees_with_the_runs_evaluation_is_named(defective_site, distilbert_dir, sentiment_dir, tmp_path):
    (problem,) = problems_of("swapped-predictor", distilbert_dir, sentiment_dir, tmp_path)
    assert re.fullmatch(r"with full: Task.predictor: \S+/runs/full/model, loaded the way its card says, predicts [01] for "
                        r"the run's test example 0 where the run predicted [01]", problem), problem
