"""Share of examples whose true class is among the five highest-scoring classes. Computed only when there are more than five classes (with five or fewer it is always 1); otherwise it returns nothing."""

import datasets
import evaluate
from sklearn.metrics import top_k_accuracy_score

K = 5


class Top5Accuracy(evaluate.Metric):
    top_k = K  # it reads only each example's K highest scores: evaluation may gather just those
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="prediction_scores: per example, a score per class; references: integer class ids.",
            features=datasets.Features(
                {"prediction_scores": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.top_k_accuracy_score.html"],
        )

    def _compute(self, prediction_scores, references):
        classes = len(prediction_scores[0])
        if classes <= K:
            return {}
        return {"top5_accuracy": float(top_k_accuracy_score(references, prediction_scores, k=K, labels=list(range(classes))))}
