"""Fixtures: a tiny BERT whose tokenizer splits most names into several sub-words, and tagged
sentences, written once per session; offline and quiet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune import testing

os.environ.update(testing.OFFLINE_ENV)

from ner_sentences import CONLL_TAGS, sentences, vocabulary  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    # A small vocabulary: only frequent pieces become tokens, so names are split into sub-words.
    return testing.tiny_text_model(tmp_path_factory.mktemp("tiny-bert"), "bert", words=vocabulary(), vocab_size=110)


@pytest.fixture(scope="session")
def conll_style_data(tmp_path_factory) -> Path:
    """Parquet files shaped like CoNLL-2003 on the Hub: `tokens`, and `ner_tags` as a list of ClassLabel."""
    from datasets import ClassLabel, Dataset, Features, List, Value

    folder = tmp_path_factory.mktemp("conll-style")
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=CONLL_TAGS))})
    for split, rows in {"train": sentences(96, "train", seed=3), "test": sentences(32, "test", seed=4)}.items():
        columns = {"tokens": [r["tokens"] for r in rows], "ner_tags": [[CONLL_TAGS.index(t) for t in r["tags"]] for r in rows]}
        Dataset.from_dict(columns, features=features).to_parquet(folder / f"{split}.parquet")
    return folder
