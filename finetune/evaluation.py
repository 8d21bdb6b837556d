"""Metrics through `evaluate`, working offline.

The common classification metrics ship with finetune as `evaluate` modules (finetune/metrics/)
and load from the package folder; any other name is passed to `evaluate.load`, which needs
the Hub. `import evaluate` is slow (~6 s), so this is the only module that imports it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError

SHIPPED_DIR = Path(__file__).parent / "metrics"


def shipped_metrics() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.py") if not p.stem.startswith("_"))


class Metrics:
    """The metrics a recipe names, loaded once and computed together."""

    def __init__(self, names: list[str]):
        self.names = names
        self._modules = [_load(name) for name in names]

    def compute(self, predictions, references) -> dict[str, float]:
        results: dict[str, float] = {}
        for module in self._modules:
            results.update(module.compute(predictions=predictions, references=references))
        return results


def _load(name: str):
    import evaluate

    evaluate.utils.logging.disable_progress_bar()
    path = SHIPPED_DIR / f"{name}.py"
    if path.is_file():
        return evaluate.load(str(path))  # a local module file: no network involved
    try:
        return evaluate.load(name)
    except Exception as exc:
        raise FinetuneError(
            f"eval.metrics: could not load the metric '{name}' ({type(exc).__name__}: {exc}). "
            f"Metrics that work offline: {', '.join(shipped_metrics())}; other names need the Hugging Face Hub."
        ) from None
