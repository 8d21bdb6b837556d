"""What the shipped classification metrics share: their input features and the default averaging."""

import datasets
import evaluate


def info(description: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description="predictions and references: lists of integer class ids.",
        features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
    )


def default_average(predictions, references) -> str:
    """'binary' for two classes (0 and 1), else 'macro': one number that treats classes alike."""
    return "binary" if set(predictions) | set(references) <= {0, 1} else "macro"


def averaged(score_fn, predictions, references, average=None, labels=None, pos_label=1, sample_weight=None) -> float:
    """A scikit-learn precision/recall/F1 score, averaged by `average` (default: see default_average)."""
    average = average or default_average(predictions, references)
    return float(score_fn(references, predictions, average=average, labels=labels, pos_label=pos_label,
                          sample_weight=sample_weight, zero_division=0))
