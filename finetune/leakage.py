"""The leakage audit: examples of eval / test that train already holds, duplicates inside train, and one input
taught with two labels. `finetune check` reports it (`leakage_check`); a run applies `data.deduplicate` with it
(`deduplicate`), before any model is loaded.

What an example's input and label are is the task's to say (`Task.audit_input`, `Task.audit_label`); a task that
says nothing is not audited. Inputs are compared three ways:

- exact: equal after folding case and runs of whitespace (texts), or equal pixels (images);
- near, texts: MinHash over word shingles (datasketch), candidates from LSH (at LSH_THRESHOLD), each one kept only
  when the exact Jaccard similarity of its shingle sets reaches NEAR_THRESHOLD (so the count does not depend
  on MinHash's estimate);
- near, images: perceptual hashes (imagehash's phash, 64 bits) at most PHASH_MAX_DISTANCE bits apart, found
  exactly with PHASH_MAX_DISTANCE + 1 bands (two hashes that close agree on at least one band).

Everything is seeded and ordered: every process of a run computes the same audit and drops the same rows.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.checks import CheckContext, Finding, Section
from finetune.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from finetune.recipe import Recipe

SHINGLE_WORDS = 2
"""Words per shingle. Pairs of words: in a 20-word sentence, one word changed keeps a Jaccard similarity of 0.81
(with 5-word shingles, 0.6); texts shorter than that are one shingle."""
NEAR_THRESHOLD = 0.7
"""Jaccard similarity of two texts' shingle sets from which they count as near duplicates."""
NUM_PERM = 128
"""MinHash permutations: LSH's estimate of a 0.7 similarity is off by about 0.04 (1 / sqrt(128) * sqrt(0.21))."""
LSH_THRESHOLD = 0.5
"""LSH's own threshold, below NEAR_THRESHOLD: a pair at 0.7 is then a candidate almost surely (at 0.7 itself LSH
would miss about a third of them), and the exact Jaccard similarity decides."""
MINHASH_SEED = 1
"""MinHash's seed, fixed so that every process and every run finds the same candidates."""
PHASH_MAX_DISTANCE = 8
"""Bits (of 64) by which two images' perceptual hashes may differ and still count as near duplicates: a resized or
JPEG re-encoded copy differs by 0-4, two different photos by about 32."""
EXAMPLES_SHOWN = 5
"""Examples of each split pair kept for the report, metrics.json and the card."""
PAIRS = (("train", "train"), ("train", "eval"), ("train", "test"))
_EXCERPT = 60


@dataclass
class Item:
    """One audited example: its row, label, exact key and what the near comparison needs."""

    row: int
    label: Any
    key: str
    excerpt: str
    text: str | None = None
    """normalised"""
    raw: str | None = None
    """as the task gave it (the data report tokenises it)"""
    phash: int | None = None
    size: tuple[int, int] | None = None


@dataclass
class PairResult:
    exact: int = 0
    near: int = 0
    conflicting_labels: int = 0
    rows: list[int] = field(default_factory=list)
    """The second split's rows with an exact or near duplicate in the first (later rows, inside train)."""
    examples: list[dict] = field(default_factory=list)


@dataclass
class Audit:
    kind: str
    """text or image."""
    pairs: dict[str, PairResult]
    """"train/eval" → what eval shares with train; "train/train" → train's own repeats. Each example:
    {kind: exact | near | conflicting labels, train_row, row (of the pair's second split), train, excerpt}."""

    @property
    def leaked(self) -> dict[str, list[int]]:
        """eval / test rows with an exact or near duplicate in train."""
        return {name.split("/")[1]: r.rows for name, r in self.pairs.items() if name != "train/train" and r.rows}

    def facts(self) -> dict:
        method = ({"compare": "minhash", "shingle_words": SHINGLE_WORDS, "threshold": NEAR_THRESHOLD, "num_perm": NUM_PERM,
                   "seed": MINHASH_SEED} if self.kind == "text" else {"compare": "phash", "max_distance": PHASH_MAX_DISTANCE})
        return {"kind": self.kind, "near": method,
                "pairs": {name: {"exact": r.exact, "near": r.near, "conflicting_labels": r.conflicting_labels,
                                 "examples": r.examples} for name, r in self.pairs.items()}}


# -- reading the examples ------------------------------------------------------------------------------
def read_items(task, splits: DatasetDict) -> tuple[str | None, dict[str, list[Item]]]:
    """Each split's examples as the task's audit members see them; (None, {}) when the task audits none."""
    kind, items = None, {}
    for role in ("train", "eval", "test"):
        if role not in splits:
            continue
        items[role] = []
        for row, example in enumerate(splits[role]):
            value = task.audit_input(example)
            if value is None:
                continue
            kind = kind or ("text" if isinstance(value, str) else "image")
            items[role].append(_item(row, value, _hashable(task.audit_label(example)), example))
    return kind, (items if kind else {})


def _item(row: int, value, label, example: dict) -> Item:
    if isinstance(value, str):
        text, shown = normalise(value), " ".join(value.split())  # the excerpt keeps the case
        excerpt = shown if len(shown) <= _EXCERPT else shown[:_EXCERPT - 3] + "..."
        return Item(row, label, hashlib.sha256(text.encode()).hexdigest(), excerpt, text=text, raw=value)
    import imagehash

    image = value.convert("RGB")
    key = hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()
    return Item(row, label, key, _file_name(example) or f"row {row}", phash=int(str(imagehash.phash(image)), 16),
                size=image.size)


def normalise(text: str) -> str:
    """Case folded, runs of whitespace made one space, ends stripped: what `exact` compares."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def _hashable(label):
    if label is None or isinstance(label, (str, int, float, bool, tuple)):
        return label
    return json.dumps(label, sort_keys=True, default=str)


def _file_name(example: dict) -> str | None:
    """An image row's file name, for the report (an undecoded image is {"path", "bytes"})."""
    from pathlib import Path

    for value in example.values():
        path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        if isinstance(path, str) and path:
            return Path(path).name
    return None


# -- comparing -----------------------------------------------------------------------------------------
def audit(task, splits: DatasetDict) -> Audit | None:
    """The audit of `splits` (train / eval / test); None when the task gives no audit input."""
    kind, items = read_items(task, splits)
    if kind is None:
        return None
    return audit_items(kind, items)


def audit_items(kind: str, items: dict[str, list[Item]]) -> Audit:
    near = _TextIndex(items["train"]) if kind == "text" else _ImageIndex(items["train"])
    exact: dict[str, list[Item]] = {}
    for item in items["train"]:
        exact.setdefault(item.key, []).append(item)
    pairs = {}
    for first, second in PAIRS:
        if second not in items:
            continue
        inside = first == second
        result = PairResult()
        for item in items[second]:
            same = [m for m in exact.get(item.key, []) if not inside or m.row < item.row]
            if same:
                result.exact += 1
                conflict = any(m.label != item.label for m in same) and item.label is not None
                result.conflicting_labels += conflict
                _note(result, "conflicting labels" if conflict else "exact", same[0], item, second)
                continue
            similar = [m for m in near.similar(item) if (not inside or m.row < item.row) and m.key != item.key]
            if similar:
                result.near += 1
                _note(result, "near", similar[0], item, second)
        pairs[f"{first}/{second}"] = result
    return Audit(kind, pairs)


def _note(result: PairResult, kind: str, match: Item, item: Item, role: str) -> None:
    result.rows.append(item.row)
    if len(result.examples) < EXAMPLES_SHOWN:
        result.examples.append({"kind": kind, "train_row": match.row, "row": item.row, "train": match.excerpt,
                                "excerpt": item.excerpt})


def shingles(text: str) -> set[str]:
    words = text.split()
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words)}
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


class _TextIndex:
    """train's texts in MinHash LSH; `similar` confirms each candidate with the exact Jaccard similarity."""

    def __init__(self, train: list[Item]):
        from datasketch import MinHash, MinHashLSH

        self.lsh = MinHashLSH(threshold=LSH_THRESHOLD, num_perm=NUM_PERM)
        self.items, self.shingles = {}, {}
        sets = [shingles(item.text) for item in train]
        hashes = MinHash.bulk([[s.encode() for s in sorted(group)] for group in sets], num_perm=NUM_PERM, seed=MINHASH_SEED)
        with self.lsh.insertion_session() as session:
            for item, group, minhash in zip(train, sets, hashes):
                session.insert(item.row, minhash)
                self.items[item.row], self.shingles[item.row] = item, group
        self.minhash = MinHash

    def similar(self, item: Item) -> list[Item]:
        group = shingles(item.text)
        minhash = self.minhash(num_perm=NUM_PERM, seed=MINHASH_SEED)
        minhash.update_batch([s.encode() for s in sorted(group)])
        found = []
        for row in sorted(self.lsh.query(minhash)):
            other = self.shingles[row]
            if len(group & other) / len(group | other) >= NEAR_THRESHOLD:
                found.append(self.items[row])
        return found


class _ImageIndex:
    """train's perceptual hashes in PHASH_MAX_DISTANCE + 1 bands of bits: two hashes at most that many bits apart
    agree on one band at least (pigeonhole), so looking up each band finds every near pair, and only those."""

    def __init__(self, train: list[Item]):
        bands = PHASH_MAX_DISTANCE + 1
        self.masks = [sum(1 << bit for bit in range(64) if bit % bands == band) for band in range(bands)]
        self.buckets: list[dict[int, list[Item]]] = [{} for _ in self.masks]
        for item in train:
            for bucket, mask in zip(self.buckets, self.masks):
                bucket.setdefault(item.phash & mask, []).append(item)

    def similar(self, item: Item) -> list[Item]:
        found = {}
        for bucket, mask in zip(self.buckets, self.masks):
            for other in bucket.get(item.phash & mask, []):
                if bin(other.phash ^ item.phash).count("1") <= PHASH_MAX_DISTANCE:
                    found[other.row] = other
        return [found[row] for row in sorted(found)]


# -- a run: data.deduplicate ---------------------------------------------------------------------------
def deduplicate(splits: DatasetDict, task, recipe: Recipe, *, main_process: bool = True) -> tuple[DatasetDict, dict | None]:
    """Apply data.deduplicate to the finished splits: the splits (eval / test without their leaked rows under
    drop-from-eval) and the audit's facts for metrics.json (None under `none`, or when the task is not audited).
    Raises DataError under `error` when eval or test shares examples with train."""
    mode = recipe.data.deduplicate
    if mode == "none":
        return splits, None
    result = audit(task, splits)
    if result is None:
        return splits, None
    facts = {"mode": mode, **result.facts()}
    leaked = result.leaked
    if leaked and mode == "error":
        raise DataError(leak_message(result, splits) + " Remove those examples from the eval / test data, set "
                        "data.deduplicate: drop-from-eval to drop them before training, or warn to train anyway.")
    if leaked and mode == "drop-from-eval":
        facts["dropped"] = {}
        for role, rows in leaked.items():
            drop = set(rows)
            if len(drop) == len(splits[role]):
                raise DataError(f"data.deduplicate: drop-from-eval would drop every one of the {len(drop)} examples of "
                                f"the {role} split: each also appears in train. Give a {role} split of other examples.")
            splits[role] = splits[role].select([i for i in range(len(splits[role])) if i not in drop])
            facts["dropped"][role] = len(drop)
    if main_process and (leaked or _repeats(result)):
        print(warning(result, splits, mode), file=sys.stderr, flush=True)
    return splits, facts


def _repeats(result: Audit) -> bool:
    inside = result.pairs.get("train/train")
    return bool(inside and inside.rows)


def leak_message(result: Audit, splits) -> str:
    parts = []
    for name, r in result.pairs.items():
        if name != "train/train" and r.rows:
            role = name.split("/")[1]
            first = r.examples[0]
            parts.append(f"{len(r.rows)} of the {len(splits[role])} {role} examples ({r.exact} exact, {r.near} near "
                         f"duplicates; first {role} row {first['row']} ~ train row {first['train_row']}: "
                         f"{first['excerpt']!r})")
    return "data.deduplicate: " + "; ".join(parts) + " also appear in train, so their scores measure memory, not " \
        "generalisation."


def warning(result: Audit, splits, mode: str) -> str:
    text = leak_message(result, splits) if result.leaked else "data.deduplicate:"
    if result.leaked:
        text += (" They were dropped from eval / test before training (drop-from-eval)." if mode == "drop-from-eval" else
                 " Set data.deduplicate: drop-from-eval to drop them, or error to stop.")
    inside = result.pairs.get("train/train")
    if inside and inside.rows:
        text += (f" Train repeats itself: {inside.exact} exact and {inside.near} near duplicates of earlier train rows"
                 f"{f', {inside.conflicting_labels} of them with another label' if inside.conflicting_labels else ''}.")
    return "warning: " + text


# -- finetune check ------------------------------------------------------------------------------------
def leakage_check(context: CheckContext) -> Section:
    """Leakage: eval and test examples that train already holds."""
    section = Section("Leakage (duplicates between and within splits)",
                      columns=["splits", "exact", "near", "conflicting labels", "examples"])
    mode = context.recipe.data.deduplicate
    if mode == "none":
        section.skipped = "data.deduplicate is none"
        return section
    result = audit(context.task, context.splits)
    if result is None:
        section.skipped = f"the task '{context.recipe.task.name}' gives no audit input (Task.audit_input)"
        return section
    section.facts = {"mode": mode, **result.facts()}
    for name, r in result.pairs.items():
        shown = "; ".join(f"{e['kind']}: train {e['train_row']} ~ {name.split('/')[1]} {e['row']} {e['excerpt']!r}"
                          for e in r.examples[:2])
        section.rows.append([name, r.exact, r.near, r.conflicting_labels, shown or "-"])
    if result.leaked:
        level = {"error": "error", "warn": "warning", "drop-from-eval": "note"}[mode]
        fix = {"error": " A run stops here: remove them, or set data.deduplicate: drop-from-eval.",
               "warn": " Set data.deduplicate: drop-from-eval to drop them before training, or error to stop.",
               "drop-from-eval": " A run drops them from eval / test before training (drop-from-eval)."}[mode]
        section.findings.append(Finding(level, leak_message(result, context.splits) + fix, key="data.deduplicate"))
    inside = result.pairs.get("train/train")
    if inside and inside.conflicting_labels:
        section.findings.append(Finding("warning", f"train holds {inside.conflicting_labels} examples whose input "
                                        "appears earlier in train with another label: fix their labels or drop one copy.",
                                        key="data.files"))
    elif inside and inside.rows:
        section.findings.append(Finding("note", f"train repeats {inside.exact} examples exactly and {inside.near} "
                                        "nearly: those weigh more in training.", key="data.files"))
    return section

