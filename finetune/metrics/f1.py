"""Harmonic mean of precision and recall. Averaged over the task's classes (finetune passes its full label set, so a class absent from a split still counts): 'binary' for a two-class task, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import f1_score

from finetune.metrics._classification import averaged, info


class F1(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, average=None, labels=None, pos_label=1, sample_weight=None):
        return {"f1": averaged(f1_score, predictions, references, average, labels, pos_label, sample_weight)}
