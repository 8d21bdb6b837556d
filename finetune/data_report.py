"""The data report of `finetune check`: split sizes, labels per split and their imbalance, text lengths in the
model's own tokens (and the share cut at the task's max_length), image sizes, and the rows the task dropped.

It reads the examples through the same task members as the leakage audit (`Task.audit_input`, `Task.audit_label`),
and the dropped rows from `Task.data_facts` (every `*_dropped` / `*_skipped` entry, per split). The truncation
limit is the task's `max_length` option, when its options have one. No model weights are loaded: the tokenizer
alone (`AutoTokenizer.from_pretrained(source)`).
"""

from __future__ import annotations

import statistics
from collections import Counter

from finetune.checks import CheckContext, Finding, Section
from finetune.leakage import read_items

IMBALANCE_WARNING = 10.0
"""Largest class / smallest class in train above which the report warns: a classifier then learns the large
classes and its accuracy hides the small ones (watch macro F1)."""
TRUNCATED_WARNING = 0.05
"""Share of a split's texts longer than max_length above which the report warns."""


def data_check(context: CheckContext) -> Section:
    """Data: split sizes, labels, lengths, dropped rows."""
    section = Section("Data")
    splits, task = context.splits, context.task
    kind, items = read_items(task, splits)
    names = _label_names(splits, task.stratify_column)
    tokens = _token_lengths(context, items) if kind == "text" else {}
    max_length = getattr(getattr(task, "options", None), "max_length", None)
    section.columns = ["split", "examples", "labels (count)", "largest / smallest"] + (
        ["tokens median / p95 / max", f"longer than {max_length}"] if tokens else
        ["width×height min / median / max"] if kind == "image" else [])
    facts: dict = {"splits": {}}
    for role in [r for r in ("train", "eval", "test") if r in splits]:
        split_facts = {"examples": len(splits[role])}
        row = [role, len(splits[role])]
        labels = Counter(item.label for item in items.get(role, []) if _scalar(item.label))
        if labels:
            counts = {str(names.get(label, label)): n for label, n in sorted(labels.items(), key=lambda kv: -kv[1])}
            ratio = max(counts.values()) / min(counts.values())
            split_facts.update(labels=counts, imbalance=round(ratio, 2))
            row += [", ".join(f"{k} {v}" for k, v in list(counts.items())[:6]) + (" ..." if len(counts) > 6 else ""), ratio]
            if role == "train" and ratio > IMBALANCE_WARNING:
                section.findings.append(Finding("warning", _imbalance_message(counts, ratio), key="data.files"))
        else:
            row += ["-", "-"]
        if tokens:
            row += _token_cells(role, tokens.get(role, []), max_length, split_facts, section)
        elif kind == "image":
            row.append(_size_cell([item.size for item in items.get(role, [])], split_facts))
        facts["splits"][role] = split_facts
        section.rows.append(row)
    task_facts = task.data_facts()
    facts["dropped"] = _dropped(task_facts)
    for reason, per_split in facts["dropped"].items():
        counted = ", ".join(f"{role} {n}" for role, n in per_split.items())
        named = [str(v) for values in task_facts[reason].values() if isinstance(values, list) for v in values][:3]
        section.findings.append(Finding("note", f"the task dropped rows ({reason.replace('_', ' ')}): {counted}"
                                        + (f" ({', '.join(named)} ...)." if named else ".")))
    if kind is None:
        section.findings.append(Finding("note", f"the task '{context.recipe.task.name}' gives no audit input "
                                        "(Task.audit_input): labels, lengths and sizes are not reported."))
    section.facts = facts
    return section


def _scalar(label) -> bool:
    return label is not None and isinstance(label, (str, int, bool))


def _label_names(splits, column: str | None) -> dict:
    from datasets import ClassLabel

    feature = splits["train"].features.get(column) if column else None
    return dict(enumerate(feature.names)) if isinstance(feature, ClassLabel) else {}


def _imbalance_message(counts: dict, ratio: float) -> str:
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    return (f"train's classes are imbalanced: '{largest}' has {counts[largest]} examples, '{smallest}' {counts[smallest]} "
            f"({ratio:.1f} times fewer, above {IMBALANCE_WARNING:g}). Accuracy will mostly reflect the large classes: "
            "watch macro_f1 (eval.metrics), and collect or resample the small classes.")


def _token_lengths(context: CheckContext, items: dict) -> dict[str, list[int]]:
    """Each text's length in the model's tokens (special tokens included, as the task tokenises it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(context.source, revision=context.recipe.model.revision)
    except Exception:  # a model without a tokenizer of its own (a diffusers pipeline's is in a sub-folder)
        return {}
    return {role: [len(ids) for ids in tokenizer([item.raw for item in split])["input_ids"]] if split else []
            for role, split in items.items()}


def _token_cells(role: str, lengths: list[int], max_length: int | None, facts: dict, section: Section) -> list:
    if not lengths:
        return ["-", "-"]
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    facts["tokens"] = {"median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}
    if not max_length:
        return [f"{statistics.median(ordered):g} / {p95} / {ordered[-1]}", "-"]
    share = sum(n > max_length for n in ordered) / len(ordered)
    facts["tokens"].update(max_length=max_length, truncated=round(share, 4))
    if share > TRUNCATED_WARNING:
        section.findings.append(Finding(
            "warning", f"{share:.0%} of the {role} texts are longer than task.options.max_length ({max_length} tokens; "
            f"p95 {p95}, longest {ordered[-1]}): their ends are cut off. Raise task.options.max_length if the ends matter.",
            key="task.options.max_length"))
    return [f"{statistics.median(ordered):g} / {p95} / {ordered[-1]}", f"{share:.1%}"]


def _size_cell(sizes: list[tuple[int, int]], facts: dict) -> str:
    if not sizes:
        return "-"
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    low, mid, high = by_area[0], by_area[len(by_area) // 2], by_area[-1]
    facts["image_sizes"] = {"min": list(low), "median": list(mid), "max": list(high)}
    return " / ".join(f"{w}×{h}" for w, h in (low, mid, high))


def _dropped(task_facts: dict) -> dict[str, dict[str, int]]:
    """What Task.data_facts says was dropped or skipped, as counts per split (the unreadable images are named)."""
    dropped = {}
    for key, value in task_facts.items():
        if key.endswith(("_dropped", "_skipped")) and isinstance(value, dict):
            dropped[key] = {role: len(v) if isinstance(v, (list, tuple)) else int(v) for role, v in value.items()}
    return dropped
