"""Share of references found. Averaged over classes: 'binary' for two classes, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import recall_score

from finetune.metrics._classification import averaged, info


class Recall(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, **options):
        return {"recall": averaged(recall_score, predictions, references, **options)}
