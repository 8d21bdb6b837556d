"""Card sections that several task plugins share. Classification tasks (text, image) call
`classification_sections` from their `card()`: per-class precision/recall/F1 and a confusion
matrix, computed from the run's saved predictions.
"""

from __future__ import annotations

from finetune import figures
from finetune.api import RunRecord


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
    split = report_split(run)
    if split is None or not run.labels:
        return []
    report = classification_report(run.predictions[split]["predictions"], run.predictions[split]["references"], run.labels)
    image = f"confusion-matrix-{split}.png"
    figures.confusion_matrix(report["confusion_matrix"], run.labels, run.images_dir / image,
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
