"""The card's pictures, as PNG files: training curves and a confusion matrix; and the Pareto plot of `finetune compare`.

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


def pareto_plot(points: list[dict], path: Path, *, ylabel: str, title: str) -> None:
    """`finetune compare`: each variant's metric (with its interval, when it has one) against its trainable
    parameters on a log axis; the Pareto front joined by a line, the chosen variant ringed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for p in points:
        low, high = p["interval"] or (p["y"], p["y"])
        ax.errorbar([p["x"]], [p["y"]], yerr=[[p["y"] - low], [high - p["y"]]], fmt="o", capsize=4,
                    color="tab:blue" if p["front"] else "tab:gray")
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(6, 6))
        if p["chosen"]:
            ax.plot([p["x"]], [p["y"]], "o", markersize=16, markerfacecolor="none", markeredgecolor="tab:red",
                    label=f"chosen: {p['label']}")
    front = sorted((p for p in points if p["front"]), key=lambda p: p["x"])
    ax.plot([p["x"] for p in front], [p["y"] for p in front], "-", color="tab:blue", alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="trainable parameters (log scale)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **_PNG)
