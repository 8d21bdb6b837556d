"""Class labels for classification tasks (text, image, a plugin's): one place that turns a label
column into a `ClassLabel` and checks it, so every classifier treats labels alike."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from finetune.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict


def encode_labels(splits: DatasetDict, column: str = "label") -> tuple[DatasetDict, list[str], dict[str, int]]:
    """Make `column` a ClassLabel in every split; return the splits, the class names and the number
    of unlabelled rows dropped per split.

    Names come from the train split's ClassLabel feature, else from its values: numbers (or strings
    that spell integers) keep their numeric order, so where they are 0..n-1 class id k is label k;
    text is sorted. Rows
    labelled -1 (GLUE's hidden test labels) are dropped; an eval or test split left empty by that
    is removed. The train split must hold at least two classes."""
    from datasets import ClassLabel, Value

    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        labels = list(feature.names)
    else:
        labels = [str(v) for v in _ordered(set(splits["train"][column]))]
        for role in splits:
            try:
                splits[role] = splits[role].cast_column(column, Value("string"))
                splits[role] = splits[role].cast_column(column, ClassLabel(names=labels))
            except ValueError as exc:
                raise DataError(
                    f"The {role} split has a label that the train split lacks ({exc}); train labels are {labels}."
                ) from None
    dropped = {}
    for role in list(splits):
        labelled = splits[role].filter(lambda batch: [v >= 0 for v in batch[column]], batched=True)
        if len(labelled) < len(splits[role]):
            dropped[role] = len(splits[role]) - len(labelled)
        if len(labelled) == 0 and role != "train":
            del splits[role]
        else:
            splits[role] = labelled
    present = sorted(set(splits["train"][column]))
    if len(present) < 2:
        only = labels[present[0]] if present else "none"
        raise DataError(
            f"The label column '{column}' has only one class ({only!r}) in the train split; "
            "a classifier needs examples of at least two classes."
        )
    return splits, labels, dropped


def label_facts(splits: DatasetDict, labels: list[str], column: str = "label") -> dict:
    """The class names and each split's examples per class, for a classifier's Task.data_facts: the
    card's label table and its imbalance note read them (finetune.reports)."""
    return {
        "labels": list(labels),
        "label_counts": {
            role: {labels[i]: n for i, n in sorted(Counter(splits[role][column]).items())}
            for role in ("train", "eval", "test")
            if role in splits
        },
    }


def _ordered(values: set) -> list:
    """Numbers in numeric order (2 before 10), text in string order."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) == len(values):
        return sorted(values)
    if all(isinstance(v, str) and v.strip().lstrip("+-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(str(v) for v in values)


def ranked_predictions(logits, labels: list[str], *, top_k: int = 1, scores: bool = False) -> list[dict]:
    """A classifier's predictor results from a batch of logits: the predicted class id (`prediction`, as
    eval_step's argmax), its name and probability, the `top_k` best classes when more than one is asked for,
    and the logits themselves with `scores` (what ranking metrics read)."""
    probabilities = logits.float().softmax(dim=-1)
    best = probabilities.topk(min(top_k, len(labels)), dim=-1)
    results = []
    for row, (values, ids) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
        prediction = int(logits[row].argmax())
        result = {"prediction": prediction, "label": labels[prediction], "score": round(float(probabilities[row, prediction]), 6)}
        if top_k > 1:
            result["top_k"] = [{"label": labels[i], "score": round(v, 6)} for v, i in zip(values, ids)]
        if scores:
            result["scores"] = logits[row].float().tolist()
        results.append(result)
    return results


def label_id(value, labels: list[str]) -> int:
    """The class id of a label value from new labelled data, by name (as encode_labels names classes)."""
    name = str(value)
    if name not in labels:
        raise ValueError(f"the label {name!r} is not one of the run's classes {labels}")
    return labels.index(name)
