"""Synthetic, IOB2-tagged sentences for tests and the tiny recipe's data, and a quick recipe for them.

Names of people, places and organisations fill slots of everyday templates. The train and test
pools share no name, so a model scores on the test pool only by reading the context.
Regenerate the tiny recipe's data with `python tests/ner_sentences.py recipes/data/tiny-ner`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

NAMES = {
    "train": {
        "PER": ["alice", "bob smith", "carla mendes", "dmitri", "eva larsen", "farid", "grace hopper", "hiro tanaka",
                "ines", "jonas weber", "kofi annan", "lena", "marco rossi", "nadia"],
        "LOC": ["paris", "berlin", "new york", "lagos", "osaka", "lima", "cape town", "oslo", "madrid", "hanoi"],
        "ORG": ["acme corp", "globex", "initech", "red cross", "united nations", "siemens", "fifa", "unicef"],
    },
    "test": {
        "PER": ["olga petrova", "pablo", "quentin", "rosa parks", "samir khan", "tara"],
        "LOC": ["vienna", "nairobi", "toronto", "kyoto", "rome"],
        "ORG": ["umbrella inc", "wayne enterprises", "nato", "oxfam"],
    },
}
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # CoNLL-2003's order
TEMPLATES = [
    "{PER} flew to {LOC} on monday",
    "{PER} works for {ORG} in {LOC}",
    "yesterday {PER} met {PER} at the office of {ORG}",
    "the meeting in {LOC} was hosted by {ORG}",
    "{ORG} opened a new office in {LOC} last year",
    "according to {PER} , {ORG} will grow",
    "we drove from {LOC} to {LOC} with {PER}",
    "{PER} said the weather in {LOC} was fine",
    "a spokesman for {ORG} declined to comment",
    "{PER} joined {ORG} after school",
]


def sentences(n: int, pool: str = "train", seed: int = 0) -> list[dict]:
    """`n` sentences as {"tokens": [...], "tags": [...]} with names drawn from `pool`."""
    rng = random.Random(seed)
    names = NAMES[pool]
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for word in rng.choice(TEMPLATES).split():
            if word.startswith("{"):
                kind = word[1:-1]
                for i, part in enumerate(rng.choice(names[kind]).split()):
                    tokens.append(part)
                    tags.append(("B-" if i == 0 else "I-") + kind)
            else:
                tokens.append(word)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def vocabulary() -> list[str]:
    """Every word the sentences use, for a tiny tokenizer."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    words |= {part for pool in NAMES.values() for kind in pool.values() for name in kind for part in name.split()}
    return sorted(words)


def ner_recipe(model_dir: Path, data_dir: Path, run_dir: Path, method_name: str = "full", **sections) -> dict:
    """A quick token-classification recipe on the CoNLL-shaped parquet files."""
    recipe = {
        "name": f"tiny-ner-{method_name}",
        "task": {"name": "token-classification", "options": {"max_length": 32}},
        "model": {"name": str(model_dir)},
        "data": {"files": {"train": str(data_dir / "train.parquet"), "test": str(data_dir / "test.parquet")},
                 "columns": {"ner_tags": "tags"}},
        "method": {"name": method_name},
        "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "log_every_steps": 2, "seed": 7},
        "output": {"dir": str(run_dir)},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


if __name__ == "__main__":
    import json

    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for split, (n, pool, seed) in {"train": (240, "train", 0), "test": (120, "test", 1)}.items():
        with (folder / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in sentences(n, pool, seed))
