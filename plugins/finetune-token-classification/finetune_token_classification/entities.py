"""Entity-level precision, recall and F1, micro-averaged over all entities as CoNLL's conlleval
scores them, and the share of words tagged right; from tag sequences ('B-PER', 'I-PER', 'O' ...),
computed by seqeval. An entity is right only when its type and all of its words are."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score


class Entities(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: one list of tags per sentence, one tag per word.",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(self, predictions, references):
        return {
            "entity_precision": float(precision_score(references, predictions, zero_division=0)),
            "entity_recall": float(recall_score(references, predictions, zero_division=0)),
            "entity_f1": float(f1_score(references, predictions, zero_division=0)),
            "tag_accuracy": float(accuracy_score(references, predictions)),
        }
