"""Matthews correlation coefficient: a balanced score in [-1, 1], robust to class imbalance."""

import evaluate
from sklearn.metrics import matthews_corrcoef

from finetune.metrics._classification import info


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}
