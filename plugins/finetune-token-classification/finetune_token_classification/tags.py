"""Tag columns: read the tag names, check the tagging scheme, store the tags as class ids.

Entity-level scores read entities from the tags' prefixes (IOB2: B- begins an entity, I- continues
it; IOBES adds E- and S-), so tags without a known prefix are refused rather than scored wrongly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict

PREFIXES = ("B-", "I-", "E-", "S-")


def tag_names(splits: DatasetDict) -> list[str]:
    """The train split's tag names: its ClassLabel's names (a Hub dataset such as CoNLL-2003), else
    every tag it uses, 'O' first, then sorted by entity type and prefix."""
    feature = getattr(splits["train"].features["tags"], "feature", None)
    if hasattr(feature, "names"):
        return list(feature.names)
    used = {tag for row in splits["train"]["tags"] for tag in row}
    return sorted(used, key=lambda tag: (tag != "O", tag[2:], tag[:2]))


def check_scheme(names: list[str]) -> None:
    odd = [name for name in names if name != "O" and not (name.startswith(PREFIXES) and len(name) > 2)]
    if odd:
        raise DataError(
            f"The tags {odd} are not IOB2 tags: token-classification scores whole entities, which it reads "
            "from tags 'O' (outside), 'B-TYPE' (begins an entity) and 'I-TYPE' (continues it); E- and S- "
            "(IOBES) are accepted too. Convert the tags, e.g. 'PER' to 'B-PER' / 'I-PER'."
        )


def entity_types(names: list[str]) -> list[str]:
    return sorted({name[2:] for name in names if name != "O"})


def encode_tags(splits: DatasetDict, names: list[str]) -> DatasetDict:
    """Every split's `tags` as a list of ClassLabel ids over `names`; tags unknown to train are refused."""
    from datasets import ClassLabel, List, Value

    for role, split in splits.items():
        feature = getattr(split.features["tags"], "feature", None)
        if isinstance(feature, ClassLabel):
            if feature.names == names:
                continue  # already ids over the same names (a Hub dataset's splits)
            split = _relabel(split, lambda row, known=feature.names: [known[i] for i in row], List(Value("string")))
        unknown = sorted({tag for row in split["tags"] for tag in row} - set(names), key=str)
        if unknown:
            raise DataError(
                f"The {role} split uses tags the train split never does: {unknown[:10]}. The model can only "
                f"predict the train split's tags ({', '.join(names)}); fix the data or add examples to train."
            )
        index = {name: i for i, name in enumerate(names)}
        splits[role] = _relabel(split, lambda row: [index[tag] for tag in row], List(ClassLabel(names=names)))
    return splits


def _relabel(split, convert, feature):
    features = split.features.copy()
    features["tags"] = feature
    return split.map(lambda batch: {"tags": [convert(row) for row in batch["tags"]]}, batched=True,
                     features=features, desc="Encoding tags")
