"""Raw data for a run: load the splits the recipe names, rename columns, carve and cap splits.

Everything here is task-agnostic; the task checks and normalises columns and labels between
`load_splits` and `finish_splits`. Splits are always called train / eval / test afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import DataError
from finetune.recipe import DATA_FORMATS, Recipe

if TYPE_CHECKING:
    from datasets import DatasetDict


def load_splits(recipe: Recipe) -> DatasetDict:
    """Load train (required), eval and test (when present) with the recipe's column renames."""
    from datasets import DatasetDict

    data = recipe.data
    raw = _load(recipe)
    wanted = {"train": data.train_split, "eval": data.eval_split, "test": data.test_split}
    if data.train_split not in raw:
        raise DataError(
            f"data.train_split: the dataset has no split '{data.train_split}'; it has {sorted(raw)}. "
            "Set data.train_split to one of them."
        )
    splits = DatasetDict({role: raw[name] for role, name in wanted.items() if name and name in raw})
    for role, split in splits.items():
        missing = [src for src in data.columns if src not in split.column_names]
        if missing:
            raise DataError(
                f"data.columns: the {role} split has no column {', '.join(map(repr, missing))}; "
                f"its columns are {split.column_names}. Map an existing column, as in {{sentence: text}}."
            )
        renames = {src: dst for src, dst in data.columns.items() if src != dst}
        if renames:
            splits[role] = split.rename_columns(renames)
    return splits


def finish_splits(splits: DatasetDict, recipe: Recipe, stratify_column: str | None) -> DatasetDict:
    """Carve an eval split from train when there is none (stratified, seeded), then apply sample caps."""
    from datasets import ClassLabel

    data, seed = recipe.data, recipe.train.seed
    if "eval" not in splits:
        train = splits["train"]
        stratify = stratify_column if isinstance(train.features.get(stratify_column), ClassLabel) else None
        try:
            parts = train.train_test_split(test_size=data.eval_fraction, seed=seed, stratify_by_column=stratify)
        except ValueError as exc:
            raise DataError(
                f"data.eval_fraction: cannot carve an eval split of {data.eval_fraction} from {len(train)} "
                f"training examples ({exc}). Give an eval split (data.eval_split / data.files) or more data."
            ) from None
        splits["train"], splits["eval"] = parts["train"], parts["test"]
    caps = {"train": data.max_train_samples, "eval": data.max_eval_samples, "test": data.max_eval_samples}
    for role, cap in caps.items():
        if cap and role in splits and len(splits[role]) > cap:
            splits[role] = splits[role].shuffle(seed=seed).select(range(cap)).flatten_indices()
    return splits


def _load(recipe: Recipe) -> DatasetDict:
    from datasets import load_dataset

    data = recipe.data
    if data.files:
        builders = {DATA_FORMATS[recipe.resolve(f).suffix.lower()] for f in data.files.values()}
        if len(builders) > 1:
            raise DataError(
                f"data.files: all files must have one format; got {sorted(builders)}. Convert them to one of these."
            )
    try:
        if data.files:
            files = {split: str(recipe.resolve(f)) for split, f in data.files.items()}
            return load_dataset(builders.pop(), data_files=files)
        folder = recipe.data_folder  # a local folder: `datasets` infers its format (imagefolder, csv ...)
        return load_dataset(str(folder) if folder else data.path, data.config, revision=data.revision)
    except Exception as exc:
        source = f"the files {sorted(data.files.values())}" if data.files else f"the dataset '{data.path}'" + (
            f" (config '{data.config}')" if data.config else ""
        )
        raise DataError(
            f"data: could not load {source}: {type(exc).__name__}: {exc}. "
            "Check the name and config; without access to the Hugging Face Hub, use local files (data.files) "
            "or a local folder (data.path: a folder of images, one sub-folder per class)."
        ) from None
