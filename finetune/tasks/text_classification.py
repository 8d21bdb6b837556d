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

from finetune.api import Artifact, CardInfo, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import DataError, FinetuneError
from finetune.labels import encode_labels
from finetune.reports import classification_sections
from finetune.transformers_models import adapter_snippet, classifier_task_model

if TYPE_CHECKING:
    from pathlib import Path

    from datasets import DatasetDict

class TextClassificationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(128, ge=8, description="Truncate inputs to this many tokens.")


class TextClassification:
    Options = TextClassificationOptions
    methods = None  # every method applies
    default_metrics = ["accuracy", "f1"]
    stratify_column = "label"

    def __init__(self, options: TextClassificationOptions):
        self.options = options
        self.labels: list[str] = []
        self.unlabelled: dict[str, int] = {}
        self.tokenizer = None
        self._collator = None

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
        splits, self.labels, self.unlabelled = encode_labels(splits, "label")
        return splits

    def data_facts(self) -> dict:
        return {"unlabelled_rows_dropped": self.unlabelled} if self.unlabelled else {}

    def metric_options(self) -> dict:
        return {"labels": list(range(len(self.labels)))}  # every class counts at every evaluation

    # -- model ----------------------------------------------------------------------------
    def build_model(self, source: str, revision: str | None) -> TaskModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        except Exception as exc:
            raise FinetuneError(f"model.name: could not load a tokenizer from '{source}': {type(exc).__name__}: {exc}") from None
        return classifier_task_model(AutoModelForSequenceClassification, source, revision, self.labels, "SEQ_CLS")

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

        self._collator = DataCollatorWithPadding(tokenizer)  # pads each batch to its longest example
        return splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing")

    def collate(self, examples: list[dict]) -> dict:
        return self._collator(examples)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, model, batch: dict) -> dict:
        return {"loss": model(**batch).loss}

    def eval_step(self, model, batch: dict) -> dict:
        import torch.nn.functional as F

        out = model(**batch)
        loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")  # the model's loss, per example
        return {"loss": loss, "predictions": out.logits.argmax(dim=-1), "references": batch["labels"]}

    # -- artifacts ------------------------------------------------------------------------
    def save(self, model, directory: Path, *, adapter: bool) -> None:
        model.save_pretrained(directory)  # a PEFT adapter (with the head) or a full model
        self.tokenizer.save_pretrained(directory)

    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        labels = run.labels
        return CardInfo(
            pipeline_tag="text-classification",
            library_name="peft" if artifact.adapter else "transformers",
            usage=_usage(artifact, labels),
            description=f"classifies text into {len(labels)} classes: {', '.join(labels)}",
            sections=classification_sections(run),
        )


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
