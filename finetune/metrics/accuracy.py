"""Share of predictions equal to the reference."""

import evaluate
from sklearn.metrics import accuracy_score

from finetune.metrics._classification import info


class Accuracy(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight))}
