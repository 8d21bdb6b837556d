"""Text classification: single texts or text pairs with any transformers encoder that
supports sequence classification (DistilBERT, BERT, RoBERTa, MiniLM ...).

Columns (rename yours with `data.columns`): `text`, optional `text_pair`, `label`.
Label names come from the dataset's ClassLabel feature, else from the training data (sorted),
and are stored as `id2label` / `label2id` in the saved model.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import Artifact, BasePredictor, CardInfo, PredictOptions, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import DataError
from finetune.labels import encode_labels, label_facts, label_id, ranked_predictions
from finetune.reports import classification_limitations, classification_sections, label_table
from finetune.transformers_models import TransformersClassifier, adapter_snippet, load_for_prediction

if TYPE_CHECKING:
    from datasets import DatasetDict

class TextClassificationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(128, ge=8, description="Truncate inputs to this many tokens.")


class TextClassification(TransformersClassifier):
    Options = TextClassificationOptions
    methods = None  # every method applies
    default_metrics = ["accuracy", "f1"]
    stratify_column = "label"
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, options: TextClassificationOptions):
        super().__init__(options)
        self.labels: list[str] = []
        self.facts: dict = {}

    # -- data -----------------------------------------------------------------------------
    def prepare_data(self, splits: DatasetDict) -> DatasetDict:
        require_columns(splits, ("text", "label"))
        for role, split in splits.items():
            for column in [c for c in ("text", "text_pair", "label") if c in split.column_names]:
                empty = [i for i, v in enumerate(split[column]) if v is None or (isinstance(v, str) and not v.strip())]
                if empty:
                    raise DataError(
                        f"The {role} split has {len(empty)} empty value(s) (missing, or only whitespace) in the "
                        f"'{column}' column, first in row {empty[0]}; fill or drop those rows."
                    )
        splits, self.labels, unlabelled = encode_labels(splits, "label")
        self.facts = {"unlabelled_rows_dropped": unlabelled} if unlabelled else {}
        return splits

    def data_facts(self) -> dict:
        return self.facts

    def audit_input(self, row: dict) -> str:
        """The text, and its pair after a separator (a pair is one input: the same two texts in another pair differ)."""
        return row["text"] if row.get("text_pair") is None else f"{row['text']} [SEP] {row['text_pair']}"

    def audit_label(self, row: dict) -> int:
        return row["label"]

    def metric_options(self) -> dict:
        return {"labels": list(range(len(self.labels)))}  # every class counts at every evaluation

    def class_names(self) -> list[str]:
        return self.labels

    # -- model inputs ---------------------------------------------------------------------
    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        from transformers import DataCollatorWithPadding

        tokenizer = self.tokenizer
        max_length = self.options.max_length
        has_pair = "text_pair" in splits["train"].column_names

        def tokenize(batch):
            pair = batch["text_pair"] if has_pair else None
            encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
            encoded["labels"] = batch["label"]
            return encoded

        self.collator = DataCollatorWithPadding(tokenizer)  # pads each batch to its longest example
        self.facts.update(label_facts(splits, self.labels))  # the final splits: eval may be carved from train
        return splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing")

    # -- steps ----------------------------------------------------------------------------
    def eval_step(self, model, batch: dict) -> dict:
        import torch.nn.functional as F

        out = model(**batch)
        loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")  # the model's loss, per example
        return {"loss": loss, "predictions": out.logits.argmax(dim=-1), "references": batch["labels"]}

    # -- card -----------------------------------------------------------------------------
    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        labels = run.task_facts["labels"]
        return CardInfo(
            pipeline_tag="text-classification",
            library_name="peft" if artifact.adapter else "transformers",
            usage=_usage(artifact, labels),
            description=f"classifies text into {len(labels)} classes: {', '.join(labels)}",
            sections=classification_sections(run),
            data_sections=label_table(run),
            limitations=classification_limitations(run),
        )

    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions) -> TextPredictor:
        labels = run.task_facts["labels"]
        model, tokenizer = load_for_prediction(artifact, self.auto_class, labels, options.device)
        return TextPredictor(model, tokenizer, labels, run.recipe.task_options.max_length, options)


class TextPredictor(BasePredictor):
    """Texts (and text pairs: a `text_pair` column) → a class, truncated at the run's max_length as it trained."""

    column = "text"

    def __init__(self, model, tokenizer, labels: list[str], max_length: int, options: PredictOptions):
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.max_length, self.options = max_length, options

    def read(self, row: dict) -> tuple[str, str | None]:
        text, pair = row.get("text"), row.get("text_pair")
        for name, value in (("text", text), ("text_pair", pair)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"the {name} is {type(value).__name__}, not a string")
        if not text or not text.strip():
            raise ValueError("the text is empty")
        return text, pair

    def predict(self, inputs: list[tuple[str, str | None]]) -> list[dict]:
        import torch

        texts, pairs = [t for t, _ in inputs], [p for _, p in inputs]
        pairs = [p or "" for p in pairs] if any(p is not None for p in pairs) else None
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.options.device)
        with torch.no_grad():
            logits = self.model(**encoded).logits
        return ranked_predictions(logits, self.labels, top_k=self.options.top_k, scores=self.options.scores)

    def reference(self, row: dict) -> int:
        return label_id(row.get("label"), self.labels)

    def metric_options(self) -> dict:
        return {"labels": list(range(len(self.labels)))}


def _usage(artifact: Artifact, labels: list[str]) -> str:
    example = "This was a wonderful experience."
    if not artifact.adapter:
        return f"""\
from transformers import pipeline

classifier = pipeline("text-classification", model={json.dumps(artifact.location)})
print(classifier("{example}"))
"""
    return adapter_snippet(artifact, "AutoModelForSequenceClassification", labels) + f"""\
import torch

inputs = tokenizer(["{example}"], return_tensors="pt")
with torch.no_grad():
    print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])
"""
