"""The shipped evaluate modules work offline and give the textbook numbers."""

import pytest

from finetune.errors import FinetuneError
from finetune.evaluation import Metrics, shipped_metrics


def test_shipped_metrics():
    assert shipped_metrics() == ["accuracy", "f1", "matthews_correlation", "precision", "recall"]


def test_binary_scores():
    # tp=1 fp=1 fn=0 tn=2
    scores = Metrics(shipped_metrics()).compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    assert scores["accuracy"] == 0.75
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["matthews_correlation"] == pytest.approx(1 / 3**0.5)


def test_multiclass_scores_are_macro_averaged():
    scores = Metrics(["f1", "precision", "recall"]).compute(predictions=[0, 1, 2, 0], references=[0, 1, 2, 1])
    # per class precision 0.5, 1, 1; recall 1, 0.5, 1
    assert scores["precision"] == pytest.approx(2.5 / 3)
    assert scores["recall"] == pytest.approx(2.5 / 3)
    assert scores["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_unknown_metric_without_the_hub():
    with pytest.raises(FinetuneError, match="could not load the metric 'bleurt-xl'.*Metrics that work offline: accuracy, f1"):
        Metrics(["bleurt-xl"])
