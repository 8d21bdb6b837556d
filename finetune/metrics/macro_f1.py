"""F1 averaged over classes with equal weight (macro), whatever the number of classes: unlike `f1`, also macro for two classes, where neither class is "positive"."""

import evaluate
from sklearn.metrics import f1_score

from finetune.metrics._classification import averaged, info


class MacroF1(evaluate.Metric):
    def _info(self):
        return info(__doc__)

    def _compute(self, predictions, references, labels=None, sample_weight=None):
        return {"macro_f1": averaged(f1_score, predictions, references, average="macro", labels=labels,
                                     sample_weight=sample_weight)}
