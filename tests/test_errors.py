"""Bad input gives one clear message, a non-zero exit, no traceback, and touches no run directory."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from finetune import testing
from finetune.cli import main


@pytest.fixture
def previous_run(tmp_path):
    """A run directory that must survive every failed attempt, even with --overwrite."""
    run_dir = tmp_path / "previous"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: previous\n")
    (run_dir / "metrics.json").write_text('{"kept": true}')
    (run_dir / "model" / "weights").write_bytes(b"precious")
    return run_dir


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def fail(recipe_path, *extra):
    result = CliRunner().invoke(main, ["run", str(recipe_path), *extra])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert result.output.count("Error: ") == 1  # one message, after any progress bars
    return result.output[result.output.index("Error: "):]


def recipe_with(tmp_path, distilbert_dir, sentiment_dir, run_dir, **sections):
    recipe = testing.text_recipe(distilbert_dir, sentiment_dir, run_dir, "full", **sections)
    return testing.write_recipe(tmp_path / "bad.yaml", recipe)


def test_unknown_key_and_wrong_type(tmp_path, distilbert_dir, sentiment_dir, previous_run):
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run, train={"learning_rate": 1e-3, "epochs": "many"})
    output = fail(path, "--overwrite")
    assert "train.learning_rate: unknown key" in output and "did you mean 'lr'" not in output  # no close match
    assert "train.epochs: Input should be a valid integer" in output
    assert snapshot(previous_run) == before


@pytest.mark.parametrize("section,name,message", [
    ("task", "text-clasification", "task.name: unknown task 'text-clasification'. Did you mean 'text-classification'?"),
    ("method", "loRA", "method.name: unknown method 'loRA'. Did you mean 'lora'?"),
])
def test_unknown_plugin(tmp_path, distilbert_dir, sentiment_dir, previous_run, section, name, message):
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run, **{section: {"name": name}})
    assert message in fail(path, "--overwrite")
    assert snapshot(previous_run) == before


def test_missing_data_file(tmp_path, distilbert_dir, sentiment_dir, previous_run):
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run,
                       data={"files": {"train": str(tmp_path / "nope.csv")}})
    assert f"data.files.train: file not found: {tmp_path / 'nope.csv'}" in fail(path, "--overwrite")
    assert snapshot(previous_run) == before


def test_missing_column(tmp_path, distilbert_dir, previous_run):
    before = snapshot(previous_run)
    rows = [{"sentence": r["text"], "label": r["label"]} for r in testing.sentiment_examples(40)]
    testing.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    testing.write_jsonl(tmp_path / "data" / "test.jsonl", rows[:10])
    path = recipe_with(tmp_path, distilbert_dir, tmp_path / "data", previous_run)
    output = fail(path, "--overwrite")
    assert "The train split has no 'text' column (its columns: ['sentence', 'label'])" in output
    assert "data.columns: {your_column: text}" in output
    assert snapshot(previous_run) == before


def test_label_column_with_one_class(tmp_path, distilbert_dir, previous_run):
    before = snapshot(previous_run)
    rows = [r for r in testing.sentiment_examples(60) if r["label"] == "positive"]
    testing.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    testing.write_jsonl(tmp_path / "data" / "test.jsonl", rows[:5])
    path = recipe_with(tmp_path, distilbert_dir, tmp_path / "data", previous_run)
    assert "The label column 'label' has only one class ('positive') in the train split" in fail(path, "--overwrite")
    assert snapshot(previous_run) == before


def test_unseen_label_in_eval_split(tmp_path, distilbert_dir, previous_run):
    rows = testing.sentiment_examples(40)
    testing.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    testing.write_jsonl(tmp_path / "data" / "test.jsonl", [{"text": "so so", "label": "neutral"}])
    path = recipe_with(tmp_path, distilbert_dir, tmp_path / "data", previous_run)
    assert "The test split has a label that the train split lacks" in fail(path, "--overwrite")


def test_existing_run_directory_needs_resume_or_overwrite(tmp_path, distilbert_dir, sentiment_dir, previous_run):
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run)
    output = fail(path)
    assert f"The run directory {previous_run} already holds a run. Continue it with --resume" in output
    assert "no complete checkpoint" in fail(path, "--resume")
    assert snapshot(previous_run) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, distilbert_dir, sentiment_dir):
    folder = tmp_path / "my-documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, folder)
    assert "is not a finetune run directory (it has no recipe.yaml); refusing to delete it" in fail(path, "--overwrite")
    assert (folder / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("empty", [None, "", "  \t"])
def test_empty_values_in_the_data(tmp_path, distilbert_dir, previous_run, empty):
    rows = testing.sentiment_examples(40)
    rows[3]["text"] = empty
    testing.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    testing.write_jsonl(tmp_path / "data" / "test.jsonl", rows[5:10])
    path = recipe_with(tmp_path, distilbert_dir, tmp_path / "data", previous_run)
    assert ("The train split has 1 empty value(s) (missing, or only whitespace) in the 'text' column, first in row 3; "
            "fill or drop those rows.") in fail(path, "--overwrite")


def test_override_that_is_not_yaml(tmp_path, distilbert_dir, sentiment_dir):
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, tmp_path / "run")
    assert "--set name: the value '[oops' is not valid YAML" in fail(path, "--set", "name=[oops")


def test_missing_local_model_directory(tmp_path, sentiment_dir):
    path = recipe_with(tmp_path, "./no-such-model", sentiment_dir, tmp_path / "run")
    assert "model.name: the local directory" in fail(path)
    assert not (tmp_path / "run").exists()


def test_model_from_a_package_that_is_not_installed(tmp_path, sentiment_dir):
    path = recipe_with(tmp_path, "package:no_such_pkg/model", sentiment_dir, tmp_path / "run")
    assert "names the Python package 'no_such_pkg', which is not installed" in fail(path)


def test_validate_reports_without_loading_models(tmp_path, distilbert_dir, sentiment_dir):
    good = recipe_with(tmp_path, distilbert_dir, sentiment_dir, tmp_path / "run")
    result = CliRunner().invoke(main, ["validate", str(good)])
    assert result.exit_code == 0 and "valid (text-classification with full" in result.output
    result = CliRunner().invoke(main, ["validate", str(good), "--set", "method.options.rank=4"])
    assert result.exit_code == 1 and "method.options.rank: unknown key" in result.output


def test_eval_split_that_is_the_test_split(tmp_path, distilbert_dir, sentiment_dir, previous_run):
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run, data={"eval_split": "test"})
    output = fail(path, "--overwrite")
    assert "data: eval_split and test_split are both 'test': early stopping and the best-model choice" in output
    assert "Set data.eval_split to another split, or to null to carve one from train" in output
    assert snapshot(previous_run) == before


def test_fp16_without_a_gpu_is_refused_rather_than_run_in_fp32(tmp_path, distilbert_dir, sentiment_dir, previous_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is available")
    before = snapshot(previous_run)
    path = recipe_with(tmp_path, distilbert_dir, sentiment_dir, previous_run, train={"mixed_precision": "fp16"})
    assert "train.mixed_precision: 'fp16' needs a GPU, and this run is on the CPU" in fail(path, "--overwrite")
    assert snapshot(previous_run) == before
