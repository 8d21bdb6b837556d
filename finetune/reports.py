"""What a classifier's card shows, for every classification task (text, image, a plugin's) to call
from its `card()`: per-class precision/recall/F1 and a confusion matrix from the run's saved
predictions, the label counts per split, and the notes on small splits and imbalanced classes.

They read the class names and counts a classifier records in its Task.data_facts with
`finetune.labels.label_facts`.
"""

from __future__ import annotations

import math

from finetune import figures
from finetune.api import SMALL_SPLIT, RunRecord

IMBALANCE = 3.0  # most / least frequent training class above this: the card warns


def classification_report(predictions: list[int], references: list[int], labels: list[str]) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=ids, zero_division=0
    )
    return {
        "per_class": [
            {"label": labels[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i in ids
        ],
        "confusion_matrix": confusion_matrix(references, predictions, labels=ids).tolist(),
    }


def report_split(run: RunRecord) -> str | None:
    """The split the card's per-class results describe: test when the run has one, else eval."""
    return next((s for s in ("test", "eval") if run.predictions.get(s, {}).get("predictions")), None)


def classification_sections(run: RunRecord) -> list[str]:
    """Markdown for the card: a per-class table and an embedded confusion matrix (written to images/)."""
    split, labels = report_split(run), run.task_facts.get("labels")
    if split is None or not labels:
        return []
    report = classification_report(run.predictions[split]["predictions"], run.predictions[split]["references"], labels)
    image = f"confusion-matrix-{split}.png"
    figures.confusion_matrix(report["confusion_matrix"], labels, run.images_dir / image,
                             title=f"Confusion matrix ({split} split)")
    rows = "\n".join(
        f"| {r['label']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
        for r in report["per_class"]
    )
    return [
        f"### Per-class results ({split} split)\n\n"
        "| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"![Confusion matrix on the {split} split](images/{image})\n"
    ]


def label_table(run: RunRecord) -> list[str]:
    """For the card's Data section: examples per class in each split."""
    labels, counts = run.task_facts.get("labels"), run.task_facts.get("label_counts")
    if not labels or not counts:
        return []
    head = "| label | " + "".join(f"{split} | " for split in counts) + "\n|---|" + "---|" * len(counts) + "\n"
    rows = "".join(f"| {label} | " + "".join(f"{c.get(label, 0)} | " for c in counts.values()) + "\n" for label in labels)
    return [head + rows]


def classification_limitations(run: RunRecord) -> list[str]:
    """The uncertainty of accuracy on a split smaller than api.SMALL_SPLIT, and imbalanced training classes."""
    notes = []
    for split, values in run.summary["metrics"].items():
        n = run.summary["split_sizes"].get(split, 0)
        if 0 < n < SMALL_SPLIT and "accuracy" in values:
            low, high = wilson_interval(values["accuracy"], n)
            notes.append(f"The {split} accuracy of {values['accuracy']:.3f} could well be anywhere from {low:.3f} to "
                         f"{high:.3f} (95% Wilson interval over its {n} examples).")
    counts = run.task_facts.get("label_counts", {}).get("train")
    if counts and min(counts.values()) > 0 and max(counts.values()) / min(counts.values()) >= IMBALANCE:
        most, least = max(counts, key=counts.get), min(counts, key=counts.get)
        notes.append(
            f"The training classes are imbalanced ('{most}': {counts[most]}, '{least}': {counts[least]} examples): "
            "overall accuracy flatters the frequent classes; read the per-class results."
        )
    return notes


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion; unlike p ± z·√(p(1-p)/n) it does not collapse at 0 or 1."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
