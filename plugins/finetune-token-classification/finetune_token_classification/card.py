"""The plugin's part of the model card: entity scores per type, computed from the run's saved
predictions, the training data's entities, and usage snippets for the saved model or adapter."""

from __future__ import annotations

import json

from finetune.api import Artifact, RunRecord
from finetune.transformers_models import adapter_snippet

EXAMPLE = "Angela Merkel met the board of Siemens in Munich."
SPLIT_TITLES = {"eval": "evaluation", "test": "test"}


def usage(artifact: Artifact, tags: list[str]) -> str:
    if not artifact.adapter:
        return f"""\
from transformers import pipeline

tagger = pipeline("token-classification", model={json.dumps(artifact.location)}, aggregation_strategy="simple")
print(tagger("{EXAMPLE}"))
"""
    return adapter_snippet(artifact, "AutoModelForTokenClassification", tags) + f"""\
from transformers import pipeline

tagger = pipeline("token-classification", model=model.merge_and_unload(), tokenizer=tokenizer, aggregation_strategy="simple")
print(tagger("{EXAMPLE}"))
"""


def entity_report(predictions: list[list[str]], references: list[list[str]]) -> dict:
    """Precision, recall, F1 and support per entity type, and micro-averaged over all entities."""
    from seqeval.metrics import classification_report

    return classification_report(references, predictions, output_dict=True, zero_division=0)


def sections(run: RunRecord) -> list[str]:
    blocks = []
    for split, saved in run.predictions.items():
        report = entity_report(saved["predictions"], saved["references"])
        types = sorted(k for k in report if not k.endswith(" avg"))
        rows = [_row(name, report[name]) for name in types] + [_row("**all (micro)**", report["micro avg"])]
        blocks.append(
            f"### Entities, {SPLIT_TITLES.get(split, split)} split ({len(saved['references'])} sentences)\n\n"
            "An entity counts as found only when its type and all of its words are right.\n\n"
            "| entity | precision | recall | F1 | support |\n|---|---|---|---|---|\n" + "\n".join(rows)
        )
    facts = run.summary.get("data", {}).get("task", {})
    trained = facts.get("entities", {}).get("train")
    if trained:
        blocks.append("Entities in the training data: " + ", ".join(f"{kind} {n}" for kind, n in trained.items()) + ".")
    return blocks


def limitations(facts: dict) -> list[str]:
    notes = []
    for split, words in facts.get("words_not_scored", {}).items():
        notes.append(f"{words} words of the {SPLIT_TITLES.get(split, split)} split lay beyond `task.options.max_length` "
                     "sub-words and were neither tagged nor scored.")
    return notes


def _row(name: str, scores: dict) -> str:
    return f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | {scores['f1-score']:.3f} | {int(scores['support'])} |"
