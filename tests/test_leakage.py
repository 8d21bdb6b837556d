"""The leakage audit (finetune/leakage.py), data.deduplicate in a run, and the data report (finetune/data_report.py).

Planted data: clean examples are 20 random words of a 60-word vocabulary (two of them share about no pair of words),
so every duplicate the audit finds is one the test planted.
"""

from __future__ import annotations

import io
import json
import random

import pytest
from click.testing import CliRunner

from finetune import testing
from finetune.checks import run_checks
from finetune.cli import main
from finetune.leakage import audit, deduplicate
from finetune.recipe import load_recipe

VOCABULARY = [f"word{i}" for i in range(60)]


def clean_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(20)) for _ in range(n)]


def one_word_changed(text: str) -> str:
    words = text.split()
    words[10] = "changed"  # in the middle: two of 19 word pairs change, Jaccard similarity 17/21 = 0.81
    return " ".join(words)


def rows(texts: list[str], labels: list[int] | None = None) -> list[dict]:
    return [{"text": t, "label": ["negative", "positive"][(labels or [i % 2 for i in range(len(texts))])[i]]}
            for i, t in enumerate(texts)]


def text_splits(train: list[dict], **others: list[dict]):
    from datasets import Dataset, DatasetDict

    from finetune.tasks.text_classification import TextClassification

    task = TextClassification(TextClassification.Options())
    splits = task.prepare_data(DatasetDict({"train": Dataset.from_list(train),
                                            **{k: Dataset.from_list(v) for k, v in others.items()}}))
    return task, splits


def counts(result, pair: str) -> tuple[int, int, int]:
    found = result.pairs[pair]
    return found.exact, found.near, found.conflicting_labels


@pytest.fixture
def planted_text():
    """train 30 clean + 2 repeats of its own; eval: 2 exact copies (case and spacing changed), 1 near copy, 1 copy
    with the other label; test: 1 near copy. Returns (train rows, eval rows, test rows)."""
    train = rows(clean_texts(30, seed=1))
    train.append(dict(train[4]))  # exact, same label
    train.append({"text": one_word_changed(train[6]["text"]), "label": train[6]["label"]})  # near
    evaluation = rows(clean_texts(10, seed=2))
    evaluation.append({"text": "  " + train[0]["text"].upper().replace(" ", "   "), "label": train[0]["label"]})
    evaluation.append({"text": train[1]["text"], "label": train[1]["label"]})
    evaluation.append({"text": one_word_changed(train[2]["text"]), "label": train[2]["label"]})
    flipped = "negative" if train[3]["label"] == "positive" else "positive"
    evaluation.append({"text": train[3]["text"], "label": flipped})
    test = rows(clean_texts(10, seed=3))
    test.insert(5, {"text": one_word_changed(train[8]["text"]), "label": train[8]["label"]})
    return train, evaluation, test


def test_planted_text_duplicates_are_found_per_split_pair(planted_text):
    """Fails if case/whitespace are not folded (the upper-cased copy is missed), if near duplicates are missed or
    counted as exact, if conflicting labels are not counted, or if train's repeats leak into train/eval."""
    train, evaluation, test = planted_text
    task, splits = text_splits(train, eval=evaluation, test=test)
    result = audit(task, splits)
    assert result.kind == "text"
    assert counts(result, "train/train") == (1, 1, 0)
    assert counts(result, "train/eval") == (3, 1, 1)
    assert counts(result, "train/test") == (0, 1, 0)
    assert result.leaked == {"eval": [10, 11, 12, 13], "test": [5]}
    example = result.pairs["train/test"].examples[0]
    assert (example["kind"], example["train_row"], example["row"]) == ("near", 8, 5)
    assert example["excerpt"].startswith(" ".join(train[8]["text"].split()[:3]))
    kinds = [e["kind"] for e in result.pairs["train/eval"].examples]
    assert kinds == ["exact", "exact", "near", "conflicting labels"]


def test_clean_text_has_no_duplicates():
    """Fails if the near threshold is so loose that unrelated texts of one vocabulary count as near duplicates."""
    task, splits = text_splits(rows(clean_texts(40, 1)), eval=rows(clean_texts(15, 2)), test=rows(clean_texts(15, 3)))
    result = audit(task, splits)
    assert all(counts(result, pair) == (0, 0, 0) for pair in result.pairs)
    assert result.leaked == {}


def test_the_audit_is_deterministic(planted_text):
    """Fails if MinHash is unseeded or the candidates are read in set order: two audits would differ."""
    train, evaluation, test = planted_text
    first = audit(*text_splits(train, eval=evaluation, test=test)).facts()
    assert audit(*text_splits(train, eval=evaluation, test=test)).facts() == first


def _images(n: int, seed: int):
    return [image for image, _ in testing.color_images(n, seed=seed, size=24)]


def _jpeg(image):
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_planted_images_are_found(tmp_path):
    """eval holds an identical copy, a resized copy and a JPEG re-encoded copy of train images; test one identical
    copy with another label. Fails if images are compared by bytes only (the altered copies are missed), if the
    phash threshold is too tight for them, or if the bands miss pairs that differ by a few bits."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from finetune.tasks.image_classification import ImageClassification

    train, evaluation, test = _images(24, 1), _images(9, 2), _images(9, 3)
    evaluation += [train[0].copy(), train[1].resize((48, 48)), _jpeg(train[2])]
    test += [train[3].copy()]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})

    def split(images, labels):
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    train_labels = [i % 3 for i in range(24)]
    splits = DatasetDict({
        "train": split(train, train_labels),
        "eval": split(evaluation, [i % 3 for i in range(9)] + train_labels[:3]),
        "test": split(test, [i % 3 for i in range(9)] + [(train_labels[3] + 1) % 3]),
    })
    task = ImageClassification(ImageClassification.Options())
    result = audit(task, task.prepare_data(splits))
    assert result.kind == "image"
    assert counts(result, "train/train") == (0, 0, 0)
    assert counts(result, "train/eval") == (1, 2, 0)
    assert counts(result, "train/test") == (1, 0, 1)
    assert result.leaked == {"eval": [9, 10, 11], "test": [9]}


def test_clean_images_have_no_duplicates():
    """Fails if the Hamming threshold is loose enough to match different noisy pictures of one colour."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from finetune.tasks.image_classification import ImageClassification

    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    splits = DatasetDict({role: Dataset.from_dict({"image": _images(n, seed), "label": [i % 3 for i in range(n)]},
                                                  features=features)
                          for role, n, seed in (("train", 30, 1), ("eval", 10, 2))})
    task = ImageClassification(ImageClassification.Options())
    result = audit(task, task.prepare_data(splits))
    assert all(counts(result, pair) == (0, 0, 0) for pair in result.pairs)


def test_a_task_without_audit_input_is_skipped(planted_text):
    """Fails if the default member audits something, or the check does not say why it skipped."""
    from finetune.api import BaseTask

    train, evaluation, _ = planted_text
    _, splits = text_splits(train, eval=evaluation)
    assert audit(BaseTask(), splits) is None


# -- data.deduplicate in a run ---------------------------------------------------------------------------
@pytest.fixture
def leaky_recipe(tmp_path, distilbert_dir, planted_text):
    """A recipe over the planted data (4 eval rows and 1 test row shared with train); make(mode) writes it."""
    train, evaluation, test = planted_text
    data = tmp_path / "data"
    files = {role: str(testing.write_jsonl(data / f"{role}.jsonl", split))
             for role, split in (("train", train), ("validation", evaluation), ("test", test))}

    def make(mode: str):
        recipe = testing.text_recipe(distilbert_dir, data, tmp_path / f"run-{mode}", "full",
                                     data={"files": files, "deduplicate": mode}, train={"epochs": 1})
        return testing.write_recipe(tmp_path / f"{mode}.yaml", recipe), tmp_path / f"run-{mode}"

    return make


def test_drop_from_eval_shrinks_eval_and_test_and_is_recorded(leaky_recipe):
    """Fails if drop-from-eval drops the wrong rows or none, touches train, if metrics.json lacks the audit under
    data.leakage, or if the card's data section does not show it. Then the card of a run recorded before the audit
    existed (no data.leakage) must still render."""
    path, run_dir = leaky_recipe("drop-from-eval")
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 32, "eval": 14 - 4, "test": 11 - 1}
    leakage = metrics["data"]["leakage"]
    assert leakage["mode"] == "drop-from-eval"
    assert leakage["dropped"] == {"eval": 4, "test": 1}
    assert {k: v["exact"] + v["near"] for k, v in leakage["pairs"].items()} == {
        "train/train": 2, "train/eval": 4, "train/test": 1}
    card = (run_dir / "README.md").read_text()
    assert "Leakage audit (`data.deduplicate: drop-from-eval`)" in card
    assert "| train/eval | 3 | 1 | 1 | 4 |" in card
    assert "also appear in train" not in card  # dropped: the scores are not overstated

    del metrics["data"]["leakage"]  # a run from before the audit
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    again = CliRunner().invoke(main, ["card", str(run_dir)])
    assert again.exit_code == 0, again.output
    assert "Leakage audit" not in (run_dir / "README.md").read_text()


def test_error_stops_before_any_model_with_the_counts(leaky_recipe, monkeypatch):
    """Fails if `error` lets the run go on, loads the model first, writes the run directory, or names neither the
    splits, the counts nor the key."""
    from finetune import pipeline

    path, run_dir = leaky_recipe("error")
    monkeypatch.setattr(pipeline, "_make_model", lambda *a, **k: pytest.fail("the model was built"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "data.deduplicate" in message and "drop-from-eval" in message
    assert "4 of the 14 eval examples (3 exact, 1 near" in message
    assert "1 of the 11 test examples (0 exact, 1 near" in message
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_warn_keeps_the_splits_and_warns_once(leaky_recipe, capsys):
    """Fails if warn drops rows, stays silent, or prints on every process (main_process=False prints nothing). The
    warning goes to stderr, as the run's other warnings do."""
    path, _ = leaky_recipe("warn")
    from finetune.data import finish_splits, load_splits
    from finetune.plugins import TASKS, load

    recipe = load_recipe(path, [])
    task = load(TASKS, "text-classification")(recipe.task_options)

    splits = finish_splits(task.prepare_data(load_splits(recipe)), recipe, task.stratify_column)
    sizes = {role: len(split) for role, split in splits.items()}
    capsys.readouterr()  # the datasets' progress bars
    kept, facts = deduplicate(splits, task, recipe, main_process=False)
    assert "data.deduplicate" not in capsys.readouterr().err
    kept, facts = deduplicate(kept, task, recipe)
    out = " ".join(capsys.readouterr().err.split())
    out = out[out.index("warning: data.deduplicate"):]
    assert {role: len(split) for role, split in kept.items()} == sizes
    assert facts["mode"] == "warn" and "dropped" not in facts
    assert out.startswith("warning: data.deduplicate: 4 of the 14 eval examples")
    assert "Train repeats itself: 1 exact and 1 near" in out


def test_none_skips_the_audit(leaky_recipe, capsys):
    """Fails if `none` still audits (or prints, or records) anything."""
    path, _ = leaky_recipe("none")
    recipe = load_recipe(path, [])
    report = run_checks(recipe, ["finetune.leakage:leakage_check"])
    assert report.sections[0].skipped == "data.deduplicate is none"
    assert deduplicate({}, None, recipe) == ({}, None)  # returns before it reads a split or asks the task


@pytest.mark.parametrize(("mode", "level", "exit_code"), [("error", "error", 1), ("warn", "warning", 4),
                                                          ("drop-from-eval", "note", 0)])
def test_finetune_check_reports_the_leak_by_mode(leaky_recipe, mode, level, exit_code):
    """Fails if the check's finding does not follow data.deduplicate (an error only where a run would stop)."""
    path, _ = leaky_recipe(mode)
    report = run_checks(load_recipe(path, []), ["finetune.leakage:leakage_check"])
    section = report.sections[0]
    assert [row[:4] for row in section.rows] == [["train/train", 1, 1, 0], ["train/eval", 3, 1, 1], ["train/test", 0, 1, 0]]
    leak = [f for f in section.findings if f.key == "data.deduplicate"]
    assert [f.level for f in leak] == [level]
    assert report.exit_code == exit_code
    assert section.facts["pairs"]["train/eval"]["conflicting_labels"] == 1


# -- the data report ---------------------------------------------------------------------------------------
def test_the_data_report_counts_labels_lengths_and_warns(tmp_path, distilbert_dir):
    """train is 22 positive to 2 negative, and a quarter of its texts are longer than max_length 16. Fails if the
    label counts, the imbalance ratio, the token lengths (the model's own tokenizer) or either warning is wrong."""
    from transformers import AutoTokenizer

    texts = clean_texts(24, seed=5)
    texts = [t if i % 4 else t + " " + t for i, t in enumerate(texts)]  # every fourth: 40 words
    train = rows(texts, labels=[0 if i < 2 else 1 for i in range(24)])
    data = tmp_path / "data"
    files = {"train": str(testing.write_jsonl(data / "train.jsonl", train)),
             "validation": str(testing.write_jsonl(data / "eval.jsonl", rows(clean_texts(6, 6))))}
    recipe = testing.text_recipe(distilbert_dir, data, tmp_path / "run", "full", data={"files": files},
                                 task={"options": {"max_length": 16}})
    report = run_checks(load_recipe(testing.write_recipe(tmp_path / "r.yaml", recipe), []),
                        ["finetune.data_report:data_check"])
    section = report.sections[0]
    train_facts = section.facts["splits"]["train"]
    assert train_facts["examples"] == 24
    assert train_facts["labels"] == {"positive": 22, "negative": 2}
    assert train_facts["imbalance"] == 11.0
    tokenizer = AutoTokenizer.from_pretrained(distilbert_dir)
    lengths = sorted(len(tokenizer(r["text"])["input_ids"]) for r in train)
    assert train_facts["tokens"]["max"] == lengths[-1]
    assert train_facts["tokens"]["truncated"] == round(sum(n > 16 for n in lengths) / 24, 4)
    assert train_facts["tokens"]["truncated"] > 0.05
    warnings = [f for f in section.findings if f.level == "warning"]
    assert {f.key for f in warnings} == {"data.files", "task.options.max_length"}
    assert section.rows[0][:2] == ["train", 24]
