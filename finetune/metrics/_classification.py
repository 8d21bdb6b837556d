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


def default_average(predictions, references, labels=None) -> str:
    """'binary' for a two-class task, else 'macro': one number that treats classes alike. With the
    task's `labels` (finetune passes them), the choice depends on the task alone, never on which
    classes one evaluation happens to contain; without them, on the classes seen."""
    if labels is not None:
        return "binary" if len(labels) == 2 else "macro"
    return "binary" if set(predictions) | set(references) <= {0, 1} else "macro"


def averaged(score_fn, predictions, references, average=None, labels=None, pos_label=1, sample_weight=None) -> float:
    """A scikit-learn precision/recall/F1 score, averaged by `average` (default: see default_average).
    With `labels`, every class counts in a macro average, also one absent from this split (scoring 0)."""
    average = average or default_average(predictions, references, labels)
    if average == "binary":
        labels = None  # scikit-learn scores `pos_label` alone
    return float(score_fn(references, predictions, average=average, labels=labels, pos_label=pos_label,
                          sample_weight=sample_weight, zero_division=0))
