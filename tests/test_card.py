"""The model card: Hub metadata, content computed from the run, pictures, limitations, and
`finetune card` rebuilding it from a run directory alone."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

from click.testing import CliRunner
from huggingface_hub import ModelCard

from finetune import testing
from finetune.cli import main
from finetune.reports import wilson_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def exec_snippet(snippet: str) -> list[str]:
    printed = []
    exec(snippet, {"print": lambda *args: printed.append(" ".join(map(str, args)))})
    return printed


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_card_metadata_content_and_pictures(tmp_path, pretrained_distilbert):
    # Imbalanced local data (3:1) and a base model whose own card declares a license.
    base = tmp_path / "base"
    shutil.copytree(pretrained_distilbert, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    rows = testing.sentiment_examples(200, seed=4)
    train = [r for r in rows if r["label"] == "negative"][:90] + [r for r in rows if r["label"] == "positive"][:30]
    data = tmp_path / "data"
    testing.write_jsonl(data / "train.jsonl", train)
    testing.write_jsonl(data / "test.jsonl", testing.sentiment_examples(40, seed=2))
    run_dir = tmp_path / "run"
    recipe = testing.text_recipe(base, data, run_dir, "lora", output={"merged": True}, card={"tags": ["demo"]})
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output

    summary = json.loads((run_dir / "metrics.json").read_text())
    card_text = (run_dir / "README.md").read_text()
    card = ModelCard.load(run_dir / "README.md")
    meta = card.data
    assert meta.library_name == "peft" and meta.pipeline_tag == "text-classification"
    assert meta.license == "mit"  # the base model's, as the recipe names none
    assert meta.tags == ["finetune", "text-classification", "lora", "demo"]
    assert meta.metrics == ["accuracy", "f1"]

    # model-index names the local files and their content hashes instead of a Hub id.
    results = {(r.dataset_split, r.metric_type): r for r in meta.eval_results}
    test_acc = results[("test", "accuracy")]
    assert test_acc.metric_value == summary["metrics"]["test"]["accuracy"]
    assert test_acc.dataset_name == "test.jsonl" and test_acc.dataset_type == "json"
    assert test_acc.dataset_revision == "sha256:" + hashlib.sha256((data / "test.jsonl").read_bytes()).hexdigest()
    eval_acc = results[("train (held-out 10%, seed 7)", "accuracy")]
    assert eval_acc.dataset_name == "train.jsonl" and eval_acc.metric_value == summary["metrics"]["eval"]["accuracy"]

    # Per-class results, recomputed here from the saved predictions.
    predictions = json.loads((run_dir / "predictions.json").read_text())["test"]
    pairs = list(zip(predictions["predictions"], predictions["references"]))
    for label_id, label in enumerate(["negative", "positive"]):
        tp = sum(p == r == label_id for p, r in pairs)
        predicted = sum(p == label_id for p, _ in pairs)
        actual = sum(r == label_id for _, r in pairs)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        assert f"| {label} | {precision:.4f} | {recall:.4f} | {f1:.4f} | {actual} |" in card_text

    # Label distribution per split, file hashes, environment.
    assert "| negative | 81 | 9 | 20 | " in card_text and "| positive | 27 | 3 | 20 | " in card_text
    assert hashlib.sha256((data / "train.jsonl").read_bytes()).hexdigest() in card_text
    assert summary["environment"]["processes"] == 1 and "Hardware: CPU" in card_text
    assert f"- transformers {summary['environment']['versions']['transformers']}" in card_text

    # Pictures next to the card, embedded in it.
    for image in ("training-curves.png", "confusion-matrix-test.png"):
        assert (run_dir / "images" / image).read_bytes().startswith(PNG_MAGIC)
        assert f"](images/{image})" in card_text

    # Limitations the run shows: a 12-example eval split, 3:1 classes, an adapter on a local base.
    assert "The eval split has only 12 examples" in card_text
    assert "This model is **a LoRA adapter** of" in card_text  # the method's own title (Method.title)
    low, high = wilson_interval(summary["metrics"]["eval"]["accuracy"], 12)
    assert f"The eval accuracy of {summary['metrics']['eval']['accuracy']:.3f} could well be anywhere from {low:.3f} to {high:.3f}" in card_text
    assert f"The base model was loaded from a local folder ({base})" in card_text
    assert "The training classes are imbalanced ('negative': 81, 'positive': 27 examples)" in card_text

    # A base model from the Hub is named as such, with the adapter relation.
    from finetune.api import Artifact, CardInfo
    from finetune.card import card_data
    from finetune.rundir import read_run

    run = read_run(run_dir)
    run.summary["base_model"].update(hub_id="distilbert/distilbert-base-uncased", origin="hub")
    info = CardInfo(pipeline_tag="text-classification", library_name="peft", usage="")
    hub_meta = card_data(run, info, Artifact("me/x", adapter=True)).to_dict()
    assert hub_meta["base_model"] == "distilbert/distilbert-base-uncased" and hub_meta["base_model_relation"] == "adapter"
    assert card_data(run, info, Artifact("me/x", adapter=False)).to_dict()["base_model_relation"] == "finetune"

    # Both snippets (the adapter, the merged copy) run as written.
    adapter_snippet, merged_snippet = snippets(card_text)
    assert "PeftModel.from_pretrained(base" in adapter_snippet and "model-merged" in merged_snippet
    for snippet in (adapter_snippet, merged_snippet):
        printed = exec_snippet(snippet)
        assert len(printed) == 1 and ("negative" in printed[0] or "positive" in printed[0])


def test_card_command_rebuilds_the_card_from_a_moved_run_directory(tmp_path, pretrained_distilbert, sentiment_dir):
    data = tmp_path / "data"
    shutil.copytree(sentiment_dir, data)
    run_dir = tmp_path / "run"
    recipe = testing.text_recipe(pretrained_distilbert, data, run_dir, "full", train={"epochs": 2})
    assert invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe)).exit_code == 0
    original = (run_dir / "README.md").read_text()
    images = {p.name: p.read_bytes() for p in (run_dir / "images").iterdir()}

    # Move the run away from its data and recipe, and drop the card and pictures.
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run_dir, moved)
    shutil.rmtree(data)
    (moved / "README.md").unlink()
    shutil.rmtree(moved / "images")

    result = invoke("card", moved)
    assert result.exit_code == 0, result.output
    rebuilt = (moved / "README.md").read_text()
    # Identical, but for where the snippet loads the model from (the recipe keeps its output.dir).
    assert rebuilt == original.replace(f'"{run_dir}/model"', f'"{moved}/model"')
    assert f'"{moved}/model"' in rebuilt
    assert {p.name: p.read_bytes() for p in (moved / "images").iterdir()} == images
    printed = exec_snippet(snippets(rebuilt)[0])
    assert len(printed) == 1 and "label" in printed[0]


def test_card_command_on_an_unfinished_run_says_what_is_missing(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    result = invoke("card", tmp_path)
    assert result.exit_code == 1
    assert "holds no finished run (metrics.json, predictions.json, model missing)" in result.output
    assert "--resume" in result.output
    assert not (tmp_path / "README.md").exists()


def test_small_split_interval_does_not_collapse_at_perfect_accuracy():
    low, high = wilson_interval(1.0, 12)
    assert high == 1.0 and round(low, 3) == 0.757
    low, high = wilson_interval(0.5, 100)
    assert round(low, 3) == 0.404 and round(high, 3) == 0.596


def test_card_notes_early_stop(recipe_file):
    path, run_dir = recipe_file(
        "full", train={"lr": 1e-12, "scheduler": "constant", "epochs": 10},
        eval={"every_steps": 2, "metrics": ["accuracy"], "early_stopping": {"metric": "accuracy", "patience": 2}},
    )
    assert invoke("run", path).exit_code == 0
    card = (run_dir / "README.md").read_text()
    assert "Training stopped early at step 6: eval accuracy had not improved for 2 evaluations." in card
