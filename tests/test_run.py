"""End-to-end `finetune run` on a tiny model: every method, reloading in the ecosystem's own
tools, resuming after a crash, feature extraction's frozen backbone (several processes: test_numbers.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune.cli import main
from finetune.training.steplog import read_steplog

LABELS = ["negative", "positive"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_test_texts(sentiment_dir: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()]


def run_predictions(run_dir: Path, split: str = "test") -> list[str]:
    predictions = json.loads((run_dir / "predictions.json").read_text())[split]["predictions"]
    return [LABELS[p] for p in predictions]


def usage_snippet(card: str) -> str:
    return re.search(r"## How to use\n\n```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.parametrize("method", ["full", "feature-extraction", "lora"])
def test_run_end_to_end(method, recipe_file, sentiment_dir):
    path, run_dir = recipe_file(method, output={"merged": method == "lora"})
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    assert "test: loss" in result.output and f"model: {run_dir / 'model'}" in result.output

    for name in ("recipe.yaml", "logs/steps.jsonl", "metrics.json", "predictions.json", "README.md"):
        assert (run_dir / name).is_file(), name
    train_losses = [r["loss"] for r in read_steplog(run_dir / "logs/steps.jsonl") if "loss" in r]
    assert len(train_losses) >= 5 and train_losses[-1] < 0.9 * train_losses[0]

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"eval", "test"}
    assert set(summary["metrics"]["test"]) == {"loss", "accuracy", "f1"}
    assert summary["split_sizes"] == {"train": 144, "eval": 16, "test": 40}
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    assert trainable == total if method == "full" else 0 < trainable < total

    card = (run_dir / "README.md").read_text()
    assert f"library_name: {'peft' if method == 'lora' else 'transformers'}" in card
    assert "model-index:" in card and f"value: {summary['metrics']['test']['accuracy']}" in card

    # The card's usage snippet runs as written and predicts a known label.
    printed = []
    exec(usage_snippet(card), {"print": lambda *args: printed.append(" ".join(map(str, args)))})
    assert len(printed) == 1 and any(label in printed[0] for label in LABELS)

    texts = read_test_texts(sentiment_dir)
    expected = run_predictions(run_dir)
    if method == "lora":
        assert predict_with_peft(run_dir / "model", texts) == expected
        assert predict_with_pipeline(run_dir / "model-merged", texts) == expected
    else:
        assert predict_with_pipeline(run_dir / "model", texts) == expected


def predict_with_pipeline(model_dir: Path, texts: list[str]) -> list[str]:
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(model_dir))
    return [out["label"] for out in classifier(texts)]


def predict_with_peft(adapter_dir: Path, texts: list[str]) -> list[str]:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(adapter_dir), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_feature_extraction_leaves_backbone_bit_identical(recipe_file, pretrained_distilbert):
    path, run_dir = recipe_file("feature-extraction")
    assert invoke("run", path).exit_code == 0
    before = load_file(pretrained_distilbert / "model.safetensors")
    after = load_file(run_dir / "model" / "model.safetensors")
    assert before and all(torch.equal(before[k], after[f"distilbert.{k}"]) for k in before)
    head = [k for k in after if not k.startswith("distilbert.")]
    assert sorted(head) == ["classifier.bias", "classifier.weight", "pre_classifier.bias", "pre_classifier.weight"]


def test_feature_extraction_keeps_backbone_in_eval_mode_and_head_in_train_mode(pretrained_distilbert):
    from finetune.methods.feature_extraction import FeatureExtraction, FeatureExtractionOptions
    from finetune.tasks.text_classification import TextClassification, TextClassificationOptions
    from finetune.training.loop import train_mode

    task = TextClassification(TextClassificationOptions())
    task.labels = LABELS
    method = FeatureExtraction(FeatureExtractionOptions())
    model = method.prepare(task.build_model(str(pretrained_distilbert), None))
    assert method.frozen_modules(model) == [model.distilbert]
    train_mode(model, method.frozen_modules(model))  # as the training loop enters training mode
    assert not any(m.training for m in model.distilbert.modules())  # backbone dropout off
    assert model.dropout.training  # the head's dropout still regularises the head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}


def test_resume_after_a_crash_matches_the_uninterrupted_run(recipe_file, tmp_path, monkeypatch):
    # Accumulation over 2 batches makes the data position after a checkpoint non-trivial to restore.
    sections = dict(train={"max_steps": 12, "grad_accum_steps": 2}, eval={"every_steps": 4}, checkpoint={"every_steps": 4})
    path, _ = recipe_file("lora", **sections)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert invoke("run", path, "--set", f"output.dir={whole}").exit_code == 0

    # Crash halfway through writing the second checkpoint (step 8), after the first one is complete.
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state

    def crashing_save_state(self, output_dir, *args, **kwargs):
        if "step-00000008" in output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt  # what a user's Ctrl-C or a killed job looks like mid-write
        return real_save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crashing_save_state)
    crashed = invoke("run", path, "--set", f"output.dir={broken}")
    assert crashed.exit_code != 0 and not (broken / "model").exists()
    # The interrupted checkpoint's part-written folder is cleared (its space may be wanted); a `kill -9` would
    # leave it, and resume must ignore such a leftover.
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-00000004"]
    leftover = broken / "checkpoints" / ".step-00000008.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)

    resumed = invoke("run", path, "--set", f"output.dir={broken}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming from" in resumed.output and "step-00000004" in resumed.output

    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (whole, broken))
    assert metrics_a["metrics"] == metrics_b["metrics"]
    assert metrics_a["history"] == metrics_b["history"]
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    # The step log reads as one run: steps 5..8 logged before the crash are not repeated, and the
    # losses are the uninterrupted run's (a log line never spans a checkpoint). Throughput differs.
    def timeless(run_dir):
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in read_steplog(run_dir / "logs/steps.jsonl")]

    assert timeless(broken) == timeless(whole)
    # Resuming with another recipe is refused before anything changes.
    changed = invoke("run", path, "--set", f"output.dir={broken}", "--set", "train.batch_size=4", "--resume")
    assert changed.exit_code == 1 and "the recipe differs from the one" in changed.output
    assert "(changed: train.batch_size)" in changed.output and "only train.lr may change" in changed.output


def test_early_stopping_ends_the_run(recipe_file):
    # A zero learning rate never improves the metric: training stops after `patience` evaluations.
    path, run_dir = recipe_file(
        "full", train={"lr": 1e-12, "scheduler": "constant", "epochs": 10},
        eval={"every_steps": 2, "metrics": ["accuracy"], "early_stopping": {"metric": "accuracy", "patience": 2}},
    )
    assert invoke("run", path).exit_code == 0
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["stopped_early"] is True
    assert summary["steps"] == 6 and len(summary["history"]) == 3


def test_text_pairs_with_bert(tmp_path, bert_dir):
    from finetune import testing

    rows = testing.sentiment_examples(96, seed=3)
    pairs = [{"premise": r["text"], "hypothesis": "the staff", "gold": r["label"]} for r in rows]
    data = testing.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = testing.text_recipe(bert_dir, tmp_path, tmp_path / "run", "full",
                                 data={"files": {"train": str(data)}, "columns": {"premise": "text", "hypothesis": "text_pair", "gold": "label"}})
    path = testing.write_recipe(tmp_path / "pairs.yaml", recipe)
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["split_sizes"] == {"train": 86, "eval": 10}
    tokenizer_config = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    assert "token_type_ids" in tokenizer_config["model_input_names"]


def test_bf16_mixed_precision_on_cpu(recipe_file):
    path, run_dir = recipe_file("lora", train={"mixed_precision": "bf16", "max_steps": 4})
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    recipe_copy = (run_dir / "recipe.yaml").read_text()
    assert "mixed_precision: bf16" in recipe_copy and "r: 8" in recipe_copy  # resolved, plugin defaults included
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
