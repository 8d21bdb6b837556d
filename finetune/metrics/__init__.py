"""Metrics through `evaluate`, working offline: `Metrics` loads the metrics a recipe names and
computes them together.

Metrics are `evaluate` modules registered under the `finetune.metrics` entry point: the common
classification metrics ship with finetune (the other files of this package, computed with
scikit-learn as the Hub's versions are), plugins add theirs the same way, and `evaluate.load` runs
them from their files. Any other name is passed to `evaluate.load`, which needs the Hub.
`import evaluate` is slow (~6 s): this package imports it only when a metric is loaded.
"""

from __future__ import annotations

from finetune import plugins
from finetune.errors import FinetuneError


def installed_metrics() -> list[str]:
    """Metric names that work offline: those registered under the `finetune.metrics` entry point."""
    return sorted(plugins.available(plugins.METRICS))


class Metrics:
    """The metrics a recipe names, loaded once and computed together.

    `options` (the task's Task.metric_options, such as the full label set) go to each metric whose
    `_compute` takes them by name, so an averaged F1 means the same thing at every evaluation."""

    def __init__(self, names: list[str], options: dict | None = None):
        self.names = names
        self._modules = [_load(name) for name in names]
        self._options = [_accepted(module, options or {}) for module in self._modules]

    @property
    def score_top_k(self) -> int | None:
        """How many of each example's highest class scores the score-ranking metrics need: every one of them
        declares a `top_k` (top5_accuracy: 5), so evaluation gathers only those, not a score per class;
        None when no metric ranks scores or one needs them all (a Hub roc_auc)."""
        ranking = [module for module in self._modules if _wants_scores(module)]
        needs = [getattr(module, "top_k", None) for module in ranking]
        return max(needs) if ranking and None not in needs else None

    def compute(self, predictions, references, scores=None) -> dict[str, float]:
        """`scores` (per-class scores per example) go to the metrics whose input is
        `prediction_scores`, as evaluate's own roc_auc names it; the others get the predicted ids."""
        results: dict[str, float] = {}
        for name, module, options in zip(self.names, self._modules, self._options):
            if _wants_scores(module):
                if scores is None:
                    raise FinetuneError(
                        f"eval.metrics: '{name}' ranks classes by score, but this task's eval_step returns no `scores`. "
                        "Remove it from eval.metrics."
                    )
                results.update(module.compute(prediction_scores=scores, references=references, **options))
            else:
                results.update(module.compute(predictions=predictions, references=references, **options))
        return results


    def score(self, index: int, predictions: list, references: list) -> dict[str, float]:
        """The `index`-th metric on predicted ids, by its own `_compute` with the run's options, without `evaluate`'s
        Arrow round trip: fast enough to recompute a thousand times for a bootstrap (`finetune compare`)."""
        if _wants_scores(self._modules[index]):
            raise FinetuneError(f"eval.metrics: '{self.names[index]}' ranks classes by score, which predictions.json does not keep.")
        return self._modules[index]._compute(predictions=predictions, references=references, **self._options[index])


def _wants_scores(module) -> bool:
    features = module.features if not isinstance(module.features, list) else module.features[0]
    return "prediction_scores" in features


def _accepted(module, options: dict) -> dict:
    """The options that the module's `_compute` names (all of them when it takes **kwargs)."""
    import inspect

    parameters = inspect.signature(module._compute).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {k: v for k, v in options.items() if k in parameters}


def _load(name: str):
    import evaluate

    evaluate.utils.logging.disable_progress_bar()
    try:
        path = plugins.metric_file(name)
    except FinetuneError as exc:
        raise FinetuneError(f"eval.metrics: {exc}") from None
    if path is not None:
        return evaluate.load(str(path))  # a local module file: no network involved
    try:
        return evaluate.load(name)
    except Exception as exc:
        raise FinetuneError(
            f"eval.metrics: could not load the metric '{name}' ({type(exc).__name__}: {exc}). "
            f"Metrics that work offline: {', '.join(installed_metrics())}; other names need the Hugging Face Hub."
        ) from None
