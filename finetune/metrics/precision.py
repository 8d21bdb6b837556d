"""Share of positive predictions that are right. Averaged over classes: 'binary' for two classes, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import precision_score

from finetune.metrics._classification import averaged, info


class Precision(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, **options):
        return {"precision": averaged(precision_score, predictions, references, **options)}
