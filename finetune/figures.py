"""The card's pictures, as PNG files: training curves and a confusion matrix.

matplotlib's object API (no pyplot): no global state, no display needed. PNGs carry no
timestamp or version, so regenerating a card rewrites identical files.
"""

from __future__ import annotations

from pathlib import Path

from finetune.files import atomic_path

_PNG = {"format": "png", "dpi": 100, "metadata": {"Software": None}}


def training_curves(steps: list[dict], path: Path) -> bool:
    """Training loss and evaluation metrics against the optimizer step; False when nothing was logged."""
    from matplotlib.figure import Figure

    train = [r for r in steps if "loss" in r and "eval" not in r]
    evals = [r for r in steps if "eval" in r]
    if not train and not evals:
        return False
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="eval loss")
        for name in [k for k in evals[0]["eval"] if k != "loss"]:
            metric_ax.plot([r["step"] for r in evals], [r["eval"][name] for r in evals], "o-", label=name)
    loss_ax.set(title="Loss", xlabel="optimizer step")
    metric_ax.set(title="Evaluation metrics", xlabel="optimizer step")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    _save(fig, path)
    return True


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Counts per (true, predicted) class; numbers are written into the cells when they stay legible."""
    from matplotlib.figure import Figure

    n = len(labels)
    size = min(3 + 0.45 * n, 20)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n)
    ax.set_xticks(ticks, labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, labels)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    if n <= 30:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **_PNG)
