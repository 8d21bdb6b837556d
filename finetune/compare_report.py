"""The report of a `finetune compare`: `compare/report.md`, `report.json` and `images/pareto.png`, built from the
variants' run directories alone (metrics.json, predictions.json, model/).

- The metric is the recipe's first (`eval.metrics`, else the task's default): the first value after the loss in
  metrics.json, on the test split (the eval split when there is none); with no metric (text to image), the loss.
- Its 95% interval: for accuracy, Wilson's score interval over the split's n examples (the card's own,
  finetune.reports.wilson_interval), which does not collapse at 0 or 1 as a bootstrap does (a variant with 40 of
  40 right would get [1, 1] and nothing could be "within" it). For any other metric, a seeded percentile
  bootstrap over the split's examples: 1000 resamples with replacement drawn from numpy's `default_rng(0)`, the
  metric recomputed on each by the run's own metric code with the run's metric options (metrics.json
  `metric_options`), and the 2.5th and 97.5th percentiles (numpy's linear interpolation); every variant is scored
  on the same resamples. For the loss (text to image), the same bootstrap of the items-weighted mean of
  example_losses.json's per-example losses, as the run computed it. A metric that ranks scores (top5_accuracy) has
  no interval: predictions.json keeps no scores.
- Cost is the trainable parameters: a property of the variant, where training time and memory move with the
  machine and its load (both are reported too).
- The best variant is the cheapest (fewest trainable parameters; then training time) whose metric lies within the
  95% interval of the variant with the best metric: a difference the test split cannot tell apart is not worth
  its cost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import write_json, write_text

RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
WILSON = "Wilson score interval (z = 1.96) over the split's examples"
BOOTSTRAP = f"percentile bootstrap, {RESAMPLES} resamples of the split's examples, numpy default_rng({SEED})"
RULE = ("the cheapest variant (fewest trainable parameters, then shortest training time) whose metric lies within "
        "the 95% interval of the variant with the best metric")


@dataclass
class Row:
    """One variant's numbers, as its run directory records them."""

    name: str
    method: str
    settings: dict
    status: str
    run_dir: Path
    metric: float
    interval: list | None
    interval_method: str
    examples: int
    trainable: int
    total: int
    train_seconds: float
    peak_memory_mb: dict
    artifact_bytes: int
    all_metrics: dict = field(default_factory=dict)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def primary_metric(summary: dict) -> tuple[str, str]:
    """(split, metric name): the test split when recorded (else eval), and its first value after the loss."""
    split = "test" if "test" in summary["metrics"] else "eval"
    names = [k for k in summary["metrics"][split] if k != "loss"]
    return split, (names[0] if names else "loss")


def bootstrap(score, n: int, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> list[float]:
    """The percentile interval of `score(indices)` over `resamples` draws of n indices with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = [score(rng.integers(0, n, size=n)) for _ in range(resamples)]
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(low), float(high)]


def metric_interval(run_dir: Path, recipe, summary: dict, split: str, name: str) -> tuple[list | None, str]:
    """The metric's 95% interval and how it was made: Wilson's for accuracy (a share of examples), else the bootstrap
    recomputed from predictions.json; (None, why) when neither can be made."""
    from finetune import plugins
    from finetune.metrics import Metrics
    from finetune.reports import wilson_interval

    if name == "loss":
        return loss_interval(run_dir, summary, split)
    saved = json.loads((run_dir / "predictions.json").read_text()).get(split) or {}
    predictions, references = saved.get("predictions") or [], saved.get("references") or []
    if not predictions:
        return None, f"none: predictions.json holds no {split} predictions"
    if name == "accuracy":
        return list(wilson_interval(summary["metrics"][split][name], len(predictions))), WILSON
    module = (recipe.eval.metrics or plugins.load(plugins.TASKS, recipe.task.name).default_metrics)[0]
    metrics = Metrics([module], summary.get("metric_options") or {})
    try:
        whole = metrics.score(0, predictions, references)
    except FinetuneError as exc:
        return None, "none: " + str(exc).split(": ", 1)[-1]
    if name not in whole or abs(whole[name] - summary["metrics"][split][name]) > 1e-9:
        return None, f"none: {module} recomputed from predictions.json does not give metrics.json's {name}"

    def score(indices) -> float:
        return metrics.score(0, [predictions[i] for i in indices], [references[i] for i in indices])[name]

    return bootstrap(score, len(predictions)), BOOTSTRAP


def loss_interval(run_dir: Path, summary: dict, split: str) -> tuple[list | None, str]:
    """The bootstrap interval of the items-weighted loss, from example_losses.json's [loss × items, items] pairs."""
    import numpy as np

    path = run_dir / "example_losses.json"
    pairs = np.array(json.loads(path.read_text()).get(split) or [], dtype=float) if path.is_file() else np.zeros((0, 2))
    if not len(pairs):
        return None, f"none: the run kept no per-example {split} loss (example_losses.json)"
    weighted, items = pairs[:, 0], pairs[:, 1]
    if not math.isclose(weighted.sum() / items.sum(), summary["metrics"][split]["loss"], rel_tol=1e-9):
        return None, f"none: example_losses.json does not give metrics.json's {split} loss"
    return bootstrap(lambda i: float(weighted[i].sum() / items[i].sum()), len(pairs)), BOOTSTRAP


def read_row(variant) -> Row:
    """One variant's numbers from its run directory (finetune.compare.Variant gives the name and settings)."""
    from finetune.rundir import read_run

    run = read_run(variant.run_dir)
    summary = run.summary
    split, name = primary_metric(summary)
    interval, note = metric_interval(variant.run_dir, run.recipe, summary, split, name)
    return Row(name=variant.name, method=variant.method, settings=variant.settings, status=variant.status,
               run_dir=Path(variant.run_dir), metric=summary["metrics"][split][name], interval=interval, interval_method=note,
               examples=summary["split_sizes"].get(split, 0), trainable=summary["parameters"]["trainable"],
               total=summary["parameters"]["total"], train_seconds=summary["train_seconds"],
               peak_memory_mb=summary["peak_memory_mb"], artifact_bytes=directory_bytes(variant.run_dir / "model"),
               all_metrics=summary["metrics"][split])


def choose(rows: list[Row], higher_is_better: bool) -> tuple[Row, Row]:
    """(the variant with the best metric, the one the rule picks)."""
    sign = 1 if higher_is_better else -1
    top = max(rows, key=lambda r: (sign * r.metric, -r.trainable, -r.train_seconds))
    if top.interval is None:
        within = [r for r in rows if r.metric == top.metric]
    else:
        bound = top.interval[0] if higher_is_better else top.interval[1]
        within = [r for r in rows if sign * (r.metric - bound) >= 0]
    return top, min(within, key=lambda r: (r.trainable, r.train_seconds, r.name))


def pareto_front(rows: list[Row], higher_is_better: bool) -> list[Row]:
    """The variants no other beats on both metric and trainable parameters (at least as good on both, better on one)."""
    sign = 1 if higher_is_better else -1

    def beats(a: Row, b: Row) -> bool:
        return (sign * a.metric >= sign * b.metric and a.trainable <= b.trainable
                and (sign * a.metric > sign * b.metric or a.trainable < b.trainable))

    return sorted((r for r in rows if not any(beats(o, r) for o in rows)), key=lambda r: r.trainable)


def write_report(compare_dir: Path, rows: list[Row], *, recipe_path: str, split: str, metric: str,
                 commands: dict[str, str]) -> Path:
    """report.md, report.json and images/pareto.png in `compare_dir`; returns report.md's path."""
    from finetune.figures import pareto_plot
    from finetune.recipe import lower_is_better

    higher = not lower_is_better(metric)
    top, best = choose(rows, higher)
    front = pareto_front(rows, higher)
    picture = compare_dir / "images" / "pareto.png"
    pareto_plot([_point(r, r in front, r is best) for r in rows], picture, ylabel=f"{split} {metric} ({'higher' if higher else 'lower'} is better)",
                title=f"{metric} against trainable parameters")
    report = {
        "recipe": recipe_path, "split": split, "metric": metric, "higher_is_better": higher,
        "interval": {"level": LEVEL, "accuracy": WILSON, "other metrics": BOOTSTRAP},
        "cost": "trainable parameters", "rule": RULE, "best": best.name, "best_metric": top.name,
        "pareto_front": [r.name for r in front], "picture": str(picture.relative_to(compare_dir)),
        "variants": [_as_json(r, commands.get(r.name)) for r in rows],
    }
    write_json(compare_dir / "report.json", report)
    path = compare_dir / "report.md"
    write_text(path, render(report, rows, top, best))
    return path


def _point(row: Row, on_front: bool, chosen: bool) -> dict:
    return {"label": row.name, "x": row.trainable, "y": row.metric, "interval": row.interval, "front": on_front,
            "chosen": chosen}


def _as_json(row: Row, command: str | None) -> dict:
    return {"name": row.name, "method": row.method, "settings": row.settings, "status": row.status,
            "run_dir": str(row.run_dir), "metric": row.metric, "interval": row.interval,
            "interval_method": row.interval_method, "examples": row.examples, "metrics": row.all_metrics,
            "parameters": {"trainable": row.trainable, "total": row.total}, "train_seconds": row.train_seconds,
            "peak_memory_mb": row.peak_memory_mb, "artifact_bytes": row.artifact_bytes, "command": command}


def render(report: dict, rows: list[Row], top: Row, best: Row) -> str:
    metric, split = report["metric"], report["split"]
    gpu = any("gpu" in r.peak_memory_mb for r in rows)
    header = (f"| variant | {split} {metric} | 95% interval | trainable params | total params | training s | "
              f"peak host MB |{' peak GPU MB |' if gpu else ''} model/ bytes | this compare |")
    lines = [f"# Compare: {report['recipe']}", "",
             f"{len(rows)} variants of the recipe, each a run directory beside this report. The numbers come from each "
             f"variant's metrics.json and model/; the metric is {metric} on the {split} split "
             f"({rows[0].examples} examples).", "", header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        interval = f"{r.interval[0]:.4f} – {r.interval[1]:.4f}" if r.interval else r.interval_method
        memory = f"{r.peak_memory_mb.get('host', '')} |" + (f" {r.peak_memory_mb.get('gpu', '')} |" if gpu else "")
        lines.append(f"| {r.name} | {r.metric:.4f} | {interval} | {r.trainable:,} | {r.total:,} | {r.train_seconds:g} | "
                     f"{memory} {r.artifact_bytes:,} | {r.status} |")
    lines += ["", "## Best variant", "", f"Rule: {RULE}.", "", tradeoff(rows, top, best, metric, split),
              "", f"![{metric} against trainable parameters]({report['picture']})", "",
              f"The picture plots {metric} against trainable parameters (log scale), with each variant's 95% interval; "
              f"the line joins the Pareto front ({', '.join(report['pareto_front'])}): the variants no other beats on "
              "both.", "", "## How the numbers were made", "",
              f"- 95% interval: {rows[0].interval_method}." + (
                  " Accuracy is a share of examples; Wilson's interval does not collapse at 0 or 1 as a bootstrap does."
                  if metric == "accuracy" else
                  f" {metric} is recomputed on each resample (the same resamples for every variant) "
                  + ("as the items-weighted mean of example_losses.json" if metric == "loss" else
                     "with the run's own metric code and options, from predictions.json")
                  + "; the interval is the 2.5th to 97.5th percentile."),
              "- Cost: trainable parameters, which do not depend on the machine; training time (training steps only) "
              "and peak memory (of each variant's own process) are shown beside them.",
              "- model/ bytes: the size of the files the variant saved as its model (an adapter for LoRA)."]
    return "\n".join(lines) + "\n"


def tradeoff(rows: list[Row], top: Row, best: Row, metric: str, split: str) -> str:
    """The choice and what it costs or saves, in plain words."""
    if best is top:
        others = [r for r in rows if r is not top]
        cheaper = [r for r in others if r.trainable < top.trainable]
        tail = (f" Every cheaper variant ({', '.join(r.name for r in cheaper)}) falls outside its interval: what they "
                f"save in trainable parameters they lose in {metric} by more than the {split} split's noise explains."
                if cheaper else " No variant is cheaper.")
        dearer = [f"{r.name} ({r.metric:.4f}, {r.trainable / max(best.trainable, 1):.1f}× the trainable parameters)"
                  for r in others if r.trainable >= best.trainable]
        if dearer:
            tail += f" The others cost more for no better {metric}: {', '.join(dearer)}."
        return f"**{best.name}** has the best {metric} ({best.metric:.4f}) and is the cheapest within its interval.{tail}"
    ratio = best.trainable / top.trainable if top.trainable else float("nan")
    interval = f"{top.interval[0]:.4f} – {top.interval[1]:.4f}" if top.interval else "no interval"
    return (f"**{best.name}**: its {metric} ({best.metric:.4f}) lies within the 95% interval of the best, {top.name} "
            f"({top.metric:.4f}, {interval}), with {best.trainable:,} trainable parameters against {top.trainable:,} "
            f"({ratio:.2%}), {best.train_seconds:g} s of training against {top.train_seconds:g} s, and a model/ of "
            f"{best.artifact_bytes:,} bytes against {top.artifact_bytes:,}. On {best.examples} {split} examples "
            f"the difference of {abs(top.metric - best.metric):.4f} in {metric} is not one the data can tell apart; "
            f"{top.name} is worth its cost only if more data confirms it.")

