"""Share of positive predictions that are right. Averaged over the task's classes (finetune passes its full label set, so a class absent from a split still counts): 'binary' for a two-class task, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import precision_score

from finetune.metrics._classification import averaged, info


class Precision(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, average=None, labels=None, pos_label=1, sample_weight=None):
        return {"precision": averaged(precision_score, predictions, references, average, labels, pos_label, sample_weight)}
