"""Harmonic mean of precision and recall. Averaged over classes: 'binary' for two classes, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import f1_score

from finetune.metrics._classification import averaged, info


class F1(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, **options):
        return {"f1": averaged(f1_score, predictions, references, **options)}
