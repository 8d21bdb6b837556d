"""Data: label names from ClassLabel or the data, stratified eval carving, caps, clear load errors."""

from __future__ import annotations

from collections import Counter

import pytest

from finetune import testing
from finetune.data import finish_splits, load_splits
from finetune.errors import DataError
from finetune.recipe import load_recipe
from finetune.tasks.text_classification import TextClassification, TextClassificationOptions


def recipe_for(tmp_path, data: dict, **train):
    recipe = {
        "name": "data-test",
        "task": {"name": "text-classification"},
        "model": {"name": "unused"},
        "data": data,
        "method": {"name": "full"},
        "train": {"seed": 3, **train},
    }
    return load_recipe(testing.write_recipe(tmp_path / "r.yaml", recipe))


def prepared(recipe):
    task = TextClassification(TextClassificationOptions())
    splits = finish_splits(task.prepare_data(load_splits(recipe)), recipe, task.stratify_column)
    return task, splits


def test_eval_split_is_carved_stratified_and_seeded(tmp_path):
    rows = [{"text": f"t{i}", "label": "rare" if i % 5 == 0 else "common"} for i in range(200)]  # 40 rare, 160 common
    testing.write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = recipe_for(tmp_path, {"files": {"train": "train.jsonl"}, "eval_fraction": 0.25})
    task, splits = prepared(recipe)
    assert task.labels == ["common", "rare"]  # taken from the data, sorted
    counts = Counter(splits["eval"]["label"])
    assert len(splits["eval"]) == 50 and counts == {0: 40, 1: 10}
    assert set(splits["train"]["text"]).isdisjoint(splits["eval"]["text"])
    assert prepared(recipe)[1]["eval"]["text"] == splits["eval"]["text"]  # same seed, same carve


def test_sample_caps(tmp_path):
    testing.write_jsonl(tmp_path / "train.jsonl", testing.sentiment_examples(100))
    testing.write_jsonl(tmp_path / "val.csv.jsonl", testing.sentiment_examples(30, seed=4))
    recipe = recipe_for(tmp_path, {"files": {"train": "train.jsonl", "validation": "val.csv.jsonl"},
                                   "max_train_samples": 20, "max_eval_samples": 7})
    _, splits = prepared(recipe)
    assert (len(splits["train"]), len(splits["eval"])) == (20, 7)


def test_classlabel_names_and_unlabelled_rows(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features).to_parquet(tmp_path / "train.parquet")
    Dataset.from_dict({"sentence": ["e", "f"], "label": [-1, -1]}, features=features).to_parquet(tmp_path / "test.parquet")
    recipe = recipe_for(tmp_path, {"files": {"train": "train.parquet", "test": "test.parquet"},
                                   "columns": {"sentence": "text"}, "eval_fraction": 0.5})
    task, splits = prepared(recipe)
    assert task.labels == ["pos", "neg"]  # the dataset's order, not sorted
    assert "test" not in splits  # a test split without labels cannot be scored


def test_unknown_column_in_mapping(tmp_path):
    testing.write_jsonl(tmp_path / "train.jsonl", testing.sentiment_examples(10))
    recipe = recipe_for(tmp_path, {"files": {"train": "train.jsonl"}, "columns": {"sentence": "text"}})
    with pytest.raises(DataError, match=r"data.columns: the train split has no column 'sentence'; its columns are \['text', 'label'\]"):
        load_splits(recipe)


def test_hub_dataset_unreachable_says_what_to_do(tmp_path):
    recipe = recipe_for(tmp_path, {"path": "nyu-mll/glue", "config": "sst2"})
    with pytest.raises(DataError, match=r"could not load the dataset 'nyu-mll/glue' \(config 'sst2'\).*use local files \(data.files\)"):
        load_splits(recipe)


@pytest.mark.parametrize("as_text", [False, True])
def test_integer_labels_keep_their_numeric_identity(tmp_path, as_text):
    # 0..11 as numbers, or as strings ("10" sorts before "2" as text): class id k is label k either way.
    rows = [{"text": f"example {i}", "label": str(i % 12) if as_text else i % 12} for i in range(120)]
    testing.write_jsonl(tmp_path / "train.jsonl", rows)
    task, splits = prepared(recipe_for(tmp_path, {"files": {"train": str(tmp_path / "train.jsonl")}}))
    assert task.labels == [str(k) for k in range(12)]
    for split in ("train", "eval"):
        assert all(row["label"] == int(row["text"].split()[1]) % 12 for row in splits[split])


def test_numeric_labels_that_are_not_ids_keep_numeric_order(tmp_path):
    rows = [{"text": f"example {i}", "label": [5, 10, 2][i % 3]} for i in range(30)]
    testing.write_jsonl(tmp_path / "train.jsonl", rows)
    task, _ = prepared(recipe_for(tmp_path, {"files": {"train": str(tmp_path / "train.jsonl")}}))
    assert task.labels == ["2", "5", "10"]
