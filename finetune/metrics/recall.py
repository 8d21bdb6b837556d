"""Share of references found. Averaged over classes: 'binary' for two classes, 'macro' otherwise, unless `average` is given."""

import evaluate
from sklearn.metrics import recall_score

from finetune.metrics._classification import default_average, info


class Recall(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, average=None, labels=None, pos_label=1, sample_weight=None):
        average = average or default_average(predictions, references)
        score = recall_score(
            references, predictions, average=average, labels=labels, pos_label=pos_label,
            sample_weight=sample_weight, zero_division=0,
        )
        return {"recall": float(score)}
