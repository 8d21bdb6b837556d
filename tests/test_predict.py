"""`finetune predict` and `finetune evaluate` on a text classifier, and the round trip before a push: each
reloads the saved model as its card says and must reproduce the run's own predictions and test metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from finetune.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def saved_predictions(run: Path, split: str = "test") -> list:
    return json.loads((run / "predictions.json").read_text())[split]["predictions"]


@pytest.mark.parametrize("artifact", [[], ["--merged"]], ids=["adapter", "merged"])
def test_predict_gives_the_runs_own_test_predictions(lora_run, sentiment_dir, tmp_path, artifact):
    out = tmp_path / "results" / "test.jsonl"
    result = invoke("predict", lora_run, "--input-file", sentiment_dir / "test.jsonl", "-o", out, "--top-k", "2", *artifact)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = saved_predictions(lora_run)
    assert len(set(expected)) == 2  # the run learnt something: both classes are predicted
    assert [r["prediction"] for r in records] == expected
    texts = [json.loads(line)["text"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()]
    assert [r["input"] for r in records] == texts
    labels = ["negative", "positive"]
    for record in records:
        assert record["label"] == labels[record["prediction"]]
        assert [c["label"] for c in record["top_k"]][0] == record["label"]
        assert sum(c["score"] for c in record["top_k"]) == pytest.approx(1, abs=1e-5)  # softmax over both classes


def test_predict_prints_one_json_line_per_argument(lora_run, sentiment_dir):
    texts = [json.loads(line)["text"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()[:3]]
    result = invoke("predict", lora_run, *texts)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["input"] for r in lines] == texts
    assert [r["prediction"] for r in lines] == saved_predictions(lora_run)[:3]


def test_a_bad_input_line_is_named_and_no_output_is_left(lora_run, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"review": "a wonderful stay"}\n\n{"review": "awful food"}\n{"review": "   "}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")

    stopped = invoke("predict", lora_run, "--input-file", inputs, "--column", "review", "-o", out)
    assert stopped.exit_code == 1
    assert f"{inputs} line 4: the text is empty. Fix or remove that input, or pass --skip-bad" in stopped.output
    assert out.read_text() == "earlier results\n"  # untouched: nothing partial replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.jsonl", "out.jsonl"]  # no temporary file either

    skipped = invoke("predict", lora_run, "--input-file", inputs, "--column", "review", "-o", out, "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert f"skipped {inputs} line 4: the text is empty" in skipped.output
    assert [json.loads(line)["input"] for line in out.read_text().splitlines()] == ["a wonderful stay", "awful food"]


@pytest.mark.parametrize("args, message", [
    ([], "give the inputs as arguments or with --input-file"),
    (["--column", "x", "some text"], "--column names a column of --input-file"),
    (["--input-file", "{data}/test.jsonl", "--column", "review"], "has no column 'review'; its columns are ['text', 'label']"),
    (["--merged", "x"], None),
])
def test_predict_usage_errors_name_the_argument(lora_run, sentiment_dir, tmp_path, args, message):
    if message is None:  # --merged on a run without a merged copy: the fix is `finetune export`
        copy = shutil.copytree(lora_run, tmp_path / "run")
        shutil.rmtree(copy / "model-merged")
        result = invoke("predict", copy, *args)
        message = f"--merged: {copy / 'model-merged'} does not exist. Write it with `finetune export {copy} --merged`"
    else:
        result = invoke("predict", lora_run, *[a.format(data=sentiment_dir) for a in args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_evaluate_on_the_runs_test_file_gives_its_test_metrics(lora_run, sentiment_dir, tmp_path):
    run = shutil.copytree(lora_run, tmp_path / "run")
    result = invoke("evaluate", run, "--data", sentiment_dir / "test.jsonl", "--name", "held-out", "--update-card")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run / "evaluations" / "held-out.json").read_text())
    test = json.loads((run / "metrics.json").read_text())["metrics"]["test"]
    assert set(evaluation["metrics"]) == {"accuracy", "f1"}
    assert evaluation["metrics"] == pytest.approx({k: test[k] for k in ("accuracy", "f1")}, abs=1e-12)
    assert evaluation["predictions"] == saved_predictions(run)
    assert evaluation["examples"] == 40

    card = ModelCard.load(run / "README.md")
    on_the_file = [(r.metric_type, r.metric_value) for r in card.data.eval_results if r.dataset_name == "test.jsonl"]
    assert sorted(on_the_file) == sorted(2 * [("accuracy", test["accuracy"]), ("f1", test["f1"])])  # the run's, then ours
    assert "**held-out**: `test.jsonl` (test, 40 examples), scored afterwards with `finetune evaluate`" in card.text

    invoke("card", run)  # rewriting the card keeps the evaluation
    assert "**held-out**" in (run / "README.md").read_text()


def test_evaluate_names_a_label_the_run_never_saw(lora_run, tmp_path):
    data = tmp_path / "new.csv"
    data.write_text("text,label\ngreat place,positive\nso-so,neutral\n")
    result = invoke("evaluate", lora_run, "--data", data)
    assert result.exit_code == 1
    assert f"{data} line 3: the label 'neutral' is not one of the run's classes ['negative', 'positive']" in result.output
    assert not (lora_run / "evaluations").exists()

    missing = invoke("evaluate", lora_run, "--data", tmp_path / "nope.csv")
    assert missing.exit_code == 1 and f"--data {tmp_path / 'nope.csv'}: no such file." in missing.output


def test_push_refuses_an_adapter_that_no_longer_predicts_what_the_run_did(lora_run, tmp_path, monkeypatch):
    run = shutil.copytree(lora_run, tmp_path / "run")
    weights = run / "model" / "adapter_model.safetensors"
    tensors = load_file(weights)
    head = [k for k in tensors if "classifier" in k and "pre_classifier" not in k]
    assert head  # the trained head travels with the adapter
    save_file({k: v.flip(0) if k in head else v for k, v in tensors.items()}, weights)  # swap the two classes

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never reached: the check comes first
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = invoke("push", run, "--repo-id", "someone/model")
    assert result.exit_code == 1
    assert f"the push was not sent: {run / 'model'}, loaded the way its card says, predicts" in result.output
    assert "where the run predicted" in result.output


def test_the_round_trip_warns_and_goes_on_when_the_data_is_gone(lora_run, sentiment_dir, tmp_path):
    from finetune.predict import artifact_of, check_round_trip
    from finetune.rundir import read_run

    data = shutil.copytree(sentiment_dir, tmp_path / "data")
    run = shutil.copytree(lora_run, tmp_path / "run")
    recipe = (run / "recipe.yaml").read_text().replace(str(sentiment_dir), str(data))
    (run / "recipe.yaml").write_text(recipe)
    finished = read_run(run)
    assert check_round_trip(finished, [artifact_of(finished)]) == ([], [])
    with open(data / "test.jsonl", "a") as f:
        f.write('{"text": "a new review", "label": "positive"}\n')
    problems, warnings = check_round_trip(read_run(run), [artifact_of(finished)])
    assert problems == []
    assert warnings == [f"{run / 'model'} was not reloaded: the run's examples cannot be rebuilt (data.files: the test file "
                        "changed since the run)."]
