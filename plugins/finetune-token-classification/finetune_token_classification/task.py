"""Token classification (named-entity tagging) with any transformers encoder that has a fast
tokenizer (BERT, DistilBERT, RoBERTa, DeBERTa ...).

Columns (rename yours with `data.columns`, e.g. `{ner_tags: tags}` for CoNLL-2003): `tokens`, a
list of words per sentence, and `tags`, one IOB2 tag per word (strings, or a list of ClassLabel
as on the Hub). Words are split into sub-words by the model's tokenizer; each word's tag goes on
its first sub-word, and the other sub-words are ignored by the loss and the scores (-100), so a
prediction is one tag per word, as the data has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import Artifact, BasePredictor, CardInfo, PredictOptions, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import DataError, FinetuneError
from finetune.transformers_models import TransformersClassifier, load_for_prediction
from finetune_token_classification import card
from finetune_token_classification.tags import check_scheme, encode_tags, entity_types, tag_names

if TYPE_CHECKING:
    from datasets import DatasetDict

IGNORED = -100  # the label of sub-words after a word's first, and of special tokens: no loss, no score
# Byte-level BPE tokenizers mark a word start by a leading space; pre-split words need it added.
_PREFIX_SPACE_MODELS = {"roberta", "deberta", "gpt2", "bloom", "longformer", "bart"}


class TokenClassificationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(
        128, ge=8,
        description="Truncate sentences to this many sub-word tokens; the words cut off are not scored (the card counts them).",
    )


class TokenClassification(TransformersClassifier):
    Options = TokenClassificationOptions
    methods = ("feature-extraction", "full", "lora")
    default_metrics = ["entities"]
    stratify_column = None  # one tag per word: there is no single label to stratify on
    auto_class = "AutoModelForTokenClassification"

    def __init__(self, options: TokenClassificationOptions):
        super().__init__(options)
        self.tags: list[str] = []
        self.facts: dict = {}

    # -- data -----------------------------------------------------------------------------
    def prepare_data(self, splits: DatasetDict) -> DatasetDict:
        require_columns(splits, ("tokens", "tags"), example="{ner_tags: tags}")
        for role, split in splits.items():
            if not hasattr(split.features["tokens"], "feature"):
                raise DataError(
                    f"The {role} split's 'tokens' column holds {split.features['tokens']}, not lists of words. "
                    "token-classification needs each sentence split into words, one tag per word."
                )
        empty = {}
        for role in list(splits):
            rows = [(len(tokens), len(tags)) for tokens, tags in zip(splits[role]["tokens"], splits[role]["tags"])]
            bad = [i for i, (words, tags) in enumerate(rows) if words != tags]
            if bad:
                words, tags = rows[bad[0]]
                raise DataError(
                    f"The {role} split has {len(bad)} row(s) whose number of tags differs from their number of "
                    f"words, the first at row {bad[0]} ({words} words, {tags} tags). Each word needs exactly one tag."
                )
            empty[role] = sum(words == 0 for words, _ in rows)
            if empty[role]:
                splits[role] = splits[role].filter(lambda row: len(row["tokens"]) > 0, desc="Dropping empty sentences")
        self.tags = tag_names(splits)
        check_scheme(self.tags)
        splits = encode_tags(splits, self.tags)
        self.facts = {"tags": self.tags, "entity_types": entity_types(self.tags)}
        if any(empty.values()):
            self.facts["empty_sentences_dropped"] = {role: n for role, n in empty.items() if n}
        return splits

    def data_facts(self) -> dict:
        return self.facts

    def audit_input(self, row: dict) -> str:
        return " ".join(row["tokens"])  # the words as one text: the same sentence tokenised alike is a duplicate

    def audit_label(self, row: dict) -> tuple:
        return tuple(row["tags"])  # one tag per word: the same sentence tagged differently is a conflict

    def class_names(self) -> list[str]:
        return self.tags

    # -- model ----------------------------------------------------------------------------
    def load_tokenizer(self, source: str, revision: str | None, **options):
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(source, revision=revision).model_type
        except Exception as exc:
            raise FinetuneError(f"model.name: could not load a tokenizer from '{source}': {type(exc).__name__}: {exc}") from None
        if model_type in _PREFIX_SPACE_MODELS:
            options["add_prefix_space"] = True
        tokenizer = super().load_tokenizer(source, revision, **options)
        if not tokenizer.is_fast:
            raise FinetuneError(
                f"model.name: the tokenizer of '{source}' is a slow (Python) tokenizer. token-classification "
                "needs a fast tokenizer (tokenizer.json) to know which sub-words belong to which word."
            )
        return tokenizer

    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        from transformers import DataCollatorForTokenClassification

        tokenizer, max_length = self.tokenizer, self.options.max_length

        def tokenize(batch):
            encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            encoded["labels"] = [_first_subword_labels(encoded.word_ids(i), tags) for i, tags in enumerate(batch["tags"])]
            return encoded

        self.collator = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORED)
        # Counted here, on the final splits (an eval split may have been carved from train since prepare_data).
        self.facts["entities"] = {role: _count_entities(split["tags"], self.tags) for role, split in splits.items()}
        processed = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing")
        cut = {role: sum(map(len, splits[role]["tags"])) - sum(sum(l != IGNORED for l in row) for row in processed[role]["labels"])
               for role in processed if role != "train"}
        if any(cut.values()):
            self.facts["words_not_scored"] = {role: n for role, n in cut.items() if n}
        return processed

    # -- steps ----------------------------------------------------------------------------
    def count_items(self, batch: dict):
        """The loss averages over scored words (first sub-words), not sentences: a long sentence weighs more."""
        return (batch["labels"] != IGNORED).sum(dim=1)

    def eval_step(self, model, batch: dict) -> dict:
        import torch.nn.functional as F

        out = model(**batch)
        per_token = F.cross_entropy(out.logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORED, reduction="none")
        loss = per_token.sum(dim=1) / self.count_items(batch).clamp(min=1)  # each sentence's mean over its words
        predicted, labels = out.logits.argmax(dim=-1).tolist(), batch["labels"].tolist()
        names = self.tags
        predictions, references = [], []
        for row_predicted, row_labels in zip(predicted, labels):  # one tag per word: the first sub-words
            scored = [(p, l) for p, l in zip(row_predicted, row_labels) if l != IGNORED]
            predictions.append([names[p] for p, _ in scored])
            references.append([names[l] for _, l in scored])
        return {"loss": loss, "predictions": predictions, "references": references}

    # -- card -----------------------------------------------------------------------------
    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        facts = run.task_facts
        types = facts.get("entity_types", [])
        return CardInfo(
            pipeline_tag="token-classification",
            library_name="peft" if artifact.adapter else "transformers",
            usage=card.usage(artifact, facts.get("tags", [])),
            description=f"tags named entities of {len(types)} types ({', '.join(types)}) in text, word by word",
            tags=["ner"],
            sections=card.sections(run),
            limitations=card.limitations(facts),
        )

    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions) -> Tagger:
        tags = run.task_facts["tags"]
        model, tokenizer = load_for_prediction(artifact, self.auto_class, tags, options.device)
        return Tagger(model, tokenizer, tags, run.recipe.task_options.max_length, options)


class Tagger(BasePredictor):
    """A sentence (split on whitespace) or a `tokens` list of words → one tag per word, as eval_step tags them
    (the first sub-word's), and the entities those tags spell. Words past max_length get no tag, as in the run."""

    column = "text"

    def __init__(self, model, tokenizer, tags: list[str], max_length: int, options: PredictOptions):
        self.model, self.tokenizer, self.tags = model, tokenizer, tags
        self.max_length, self.options = max_length, options

    def read(self, row: dict) -> list[str]:
        words = row.get("tokens", row.get("text"))
        if isinstance(words, str):
            words = words.split()
        if not isinstance(words, list):
            raise ValueError(f"the sentence is {type(words).__name__}, not a string or a list of words")
        if not words or not all(isinstance(w, str) and w for w in words):
            raise ValueError("the sentence has no words" if not words else "a word is empty or not a string")
        return list(words)

    def predict(self, inputs: list[list[str]]) -> list[dict]:
        import torch
        from seqeval.metrics.sequence_labeling import get_entities

        encoded = self._encode(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            predicted = self.model(**encoded.to(self.options.device)).logits.argmax(dim=-1).tolist()
        results = []
        for i, words in enumerate(inputs):
            first = _first_subword_labels(encoded.word_ids(i), list(range(len(words))))
            tags = [self.tags[p] for p, word in zip(predicted[i], first) if word != IGNORED]
            entities = [{"type": kind, "text": " ".join(words[start:end + 1]), "start": start, "end": end + 1}
                        for kind, start, end in get_entities(tags)]
            results.append({"prediction": tags, "words": words[:len(tags)], "entities": entities})
        return results

    def reference(self, row: dict) -> list[str]:
        words, tags = self.read(row), row.get("tags")
        if not isinstance(tags, list) or len(tags) != len(words):
            raise ValueError(f"the row needs one tag per word ({len(words)} words, tags {tags!r})")
        unknown = sorted({str(t) for t in tags} - set(self.tags))
        if unknown:
            raise ValueError(f"the tags {unknown} are not among the run's {self.tags}")
        scored = sum(w != IGNORED for w in _first_subword_labels(self._encode([words]).word_ids(0), list(range(len(words)))))
        return [str(t) for t in tags[:scored]]  # the words max_length cuts are not scored, as in the run

    def _encode(self, sentences: list[list[str]], **options):
        return self.tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=self.max_length, **options)


def _first_subword_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    labels, previous = [], None
    for word in word_ids:
        labels.append(tags[word] if word is not None and word != previous else IGNORED)
        previous = word
    return labels


def _count_entities(rows: list[list[int]], names: list[str]) -> dict[str, int]:
    """Entities per type, read from the tags as the entity scores read them (seqeval)."""
    from collections import Counter

    from seqeval.metrics.sequence_labeling import get_entities

    return dict(sorted(Counter(kind for kind, _, _ in get_entities([[names[i] for i in row] for row in rows])).items()))
