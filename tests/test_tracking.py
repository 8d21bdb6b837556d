"""Experiment tracking: the trackers log what logs/steps.jsonl and metrics.json hold, a resume continues the same
tracker runs, a failing tracker never stops a run, and no secret reaches a tracker. Real trackers, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune import testing
from finetune.cli import main
from finetune.training.steplog import read_steplog

TOKEN = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"  # shaped like a Hub token: redaction masks it


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_recipe(model_dir, data_dir, run_dir: Path, report_to: list[str], **sections) -> Path:
    """Six steps, a log line every two, an evaluation and a checkpoint every three (a resume point)."""
    recipe = testing.text_recipe(model_dir, data_dir, run_dir, "full", train={"max_steps": 6, "log_every_steps": 2},
                                 eval={"every_steps": 3}, checkpoint={"every_steps": 3}, track={"report_to": report_to},
                                 **sections)
    return testing.write_recipe(run_dir.parent / f"{run_dir.name}.yaml", recipe)


def run_outputs(run_dir: Path) -> tuple[list[dict], dict]:
    return read_steplog(run_dir / "logs" / "steps.jsonl"), json.loads((run_dir / "metrics.json").read_text())


def train_series(steps: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in steps if "eval" not in r]


def eval_series(steps: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r["eval"][key]) for r in steps if "eval" in r]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, distilbert_dir, sentiment_dir) -> Path:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path_factory.mktemp("tensorboard") / "run"
    result = invoke("run", tiny_recipe(distilbert_dir, sentiment_dir, run_dir, ["tensorboard"]))
    assert result.exit_code == 0, result.output
    return run_dir


def test_tensorboard_holds_the_step_log_and_the_final_metrics(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_run / "logs" / "tracking" / "tiny-full"), size_guidance={"scalars": 0})
    events.Reload()
    steps, metrics = run_outputs(tensorboard_run)

    def logged(tag):
        return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)]  # TensorBoard keeps float32

    for key in ("loss", "lr", "grad_norm", "examples_per_s"):
        assert logged(f"train/{key}") == train_series(steps, key)
    for key in ("loss", "accuracy", "f1"):
        assert logged(f"eval/{key}") == eval_series(steps, key)
    for split, values in metrics["metrics"].items():
        for key, value in values.items():
            assert logged(f"final/{split}/{key}") == [(6, value)]
    assert "card/training-curves" in events.Tags()["images"]
    assert (tensorboard_run / "logs" / "trackers.json").is_file()


def test_a_failing_tracker_warns_once_and_the_run_ends_as_without_it(tmp_path, monkeypatch, distilbert_dir, sentiment_dir,
                                                                      tensorboard_run):
    from accelerate.tracking import TensorBoardTracker

    def server_down(self, values, step=None, **kwargs):
        raise ConnectionError("the tracking server is down")

    monkeypatch.setattr(TensorBoardTracker, "log", server_down)
    result = invoke("run", tiny_recipe(distilbert_dir, sentiment_dir, tmp_path / "run", ["tensorboard"]))
    assert result.exit_code == 0, result.output
    assert result.output.count("tensorboard tracker failed (ConnectionError: the tracking server is down)") == 1
    (steps, metrics), (tracked_steps, tracked_metrics) = run_outputs(tmp_path / "run"), run_outputs(tensorboard_run)
    assert metrics["metrics"] == tracked_metrics["metrics"]
    assert train_series(steps, "loss") == train_series(tracked_steps, "loss")


def test_trackers_that_cannot_start_warn_and_the_run_goes_on_untracked(tmp_path, capsys, distilbert_dir, sentiment_dir):
    pytest.importorskip("tensorboard")
    from finetune.recipe import load_recipe
    from finetune.rundir import RunLayout
    from finetune.tracking import tracked
    from finetune.training.engine import make_accelerator

    path = tiny_recipe(distilbert_dir, sentiment_dir, tmp_path / "run", ["tensorboard"])
    recipe = load_recipe(path, ["track.init.tensorboard.flush_every=5"])  # SummaryWriter takes no such option
    accelerator = make_accelerator(recipe)
    with tracked(accelerator, recipe, RunLayout(recipe.run_dir), resume=False) as tracking:
        assert tracking is None and accelerator.trackers == []
        accelerator.log({"train/loss": 1.0}, step=1)  # the loop's calls find no tracker
    assert capsys.readouterr().err.count("could not start (TypeError") == 1


def test_mlflow_and_wandb_log_the_run_and_a_resume_continues_their_runs(tmp_path, monkeypatch, distilbert_dir,
                                                                        sentiment_dir):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a local file store is enough here
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache"}.items():
        monkeypatch.setenv(name, str(value))
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(distilbert_dir, sentiment_dir, run_dir, ["mlflow", "wandb"],
                         hub={"commit_message": f"trained with {TOKEN}"})
    first = invoke("run", recipe)
    assert first.exit_code == 0, first.output
    ids = json.loads((run_dir / "logs" / "trackers.json").read_text())
    run_id = ids["mlflow"]["run_id"]

    from finetune.recipe import load_recipe
    from finetune.tracking import hyperparameters

    run = mlflow.get_run(run_id)
    expected = hyperparameters(load_recipe(run_dir / "recipe.yaml", cross_check=False))
    assert run.data.params == {key: str(value) for key, value in expected.items()}
    assert run.data.params["train.lr"] == "0.005" and run.data.params["track.report_to"] == '["mlflow", "wandb"]'
    assert not any(TOKEN in value for value in run.data.params.values())
    assert run.data.params["hub.commit_message"] == "trained with ***"
    client = mlflow.MlflowClient()
    steps, metrics = run_outputs(run_dir)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("train/loss") == train_series(steps, "loss")
    assert history("train/lr") == train_series(steps, "lr")
    assert history("eval/accuracy") == eval_series(steps, "accuracy")
    assert {key: run.data.metrics[f"final/test/{key}"] for key in metrics["metrics"]["test"]} == metrics["metrics"]["test"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"README.md", "images"}
    wandb_runs = run_dir / "logs" / "tracking" / "wandb"
    (offline,) = wandb_runs.glob(f"offline-run-*-{ids['wandb']['id']}")
    assert (offline / "files" / "README.md").read_text() == (run_dir / "README.md").read_text()

    # A crash right after the first checkpoint (step 3); the resumed session logs steps 4-6 into the same runs.
    resumed_dir = testing.rewind_run(run_dir, tmp_path / "resumed", step=3)
    resumed = invoke("run", resumed_dir / "recipe.yaml", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((resumed_dir / "logs" / "trackers.json").read_text()) == ids
    assert [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")] == [run_id]
    resumed_steps, _ = run_outputs(resumed_dir)
    assert dict(history("train/loss")) == dict(train_series(resumed_steps, "loss"))  # the latest value per step
    assert len(list((resumed_dir / "logs" / "tracking" / "wandb").glob(f"offline-run-*-{ids['wandb']['id']}"))) == 2


def test_no_secret_reaches_the_hyperparameters(tmp_path, distilbert_dir, sentiment_dir):
    from finetune.recipe import Recipe, load_recipe
    from finetune.tracking import hyperparameters

    # A plugin's option named like a secret is left out; a token inside any text is masked.
    recipe = Recipe.model_validate({
        "name": "secrets", "task": {"name": "text-classification", "options": {"auth_token": "s3cr3t-value", "lang": "en"}},
        "model": {"name": "m"}, "method": {"name": "full"}, "data": {"path": "d"}, "card": {"tags": [TOKEN]},
    })
    values = hyperparameters(recipe)
    assert "task.options.auth_token" not in values and values["task.options.lang"] == "en"
    assert not any("s3cr3t" in str(v) or TOKEN in str(v) for v in values.values())
    assert values["card.tags"] == '["***"]' and values["train.max_steps"] == "null" and values["train.lr"] == 5e-5
    # A secret among a tracker's options is refused before it reaches the recipe's copy in the run directory.
    path = tiny_recipe(distilbert_dir, sentiment_dir, tmp_path / "run", ["tensorboard"])
    with pytest.raises(Exception, match=r"track.init: 'tensorboard.api_key' would put a secret into the recipe"):
        load_recipe(path, ["track.init.tensorboard.api_key=abcdef123"])


def test_validate_names_the_install_for_a_missing_tracker_and_the_known_ones(tmp_path, monkeypatch, distilbert_dir,
                                                                             sentiment_dir):
    from finetune import tracking

    monkeypatch.setitem(tracking.TRACKERS, "mlflow", ("no_such_mlflow_module", "mlflow-skinny"))
    missing = invoke("validate", tiny_recipe(distilbert_dir, sentiment_dir, tmp_path / "a", ["mlflow"]))
    assert missing.exit_code == 1
    assert "track.report_to: the mlflow tracker needs the mlflow-skinny package" in missing.output
    assert "pip install mlflow-skinny (or pip install 'finetune[track]'" in missing.output
    unknown = invoke("validate", tiny_recipe(distilbert_dir, sentiment_dir, tmp_path / "b", ["tensorbaord"]))
    assert unknown.exit_code == 1
    assert "track.report_to: 'tensorbaord' is not a tracker accelerate supports; did you mean 'tensorboard'?" in unknown.output
    assert "Supported: aim, clearml, comet_ml, dvclive, mlflow, swanlab, tensorboard, trackio, wandb." in unknown.output


def test_the_tracker_list_is_accelerates():
    from accelerate.utils import LoggerType

    from finetune.tracking import TRACKERS

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}
