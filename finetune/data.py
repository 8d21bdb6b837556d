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
        files = {split: recipe.resolve(f) for split, f in data.files.items()}
        builders = {DATA_FORMATS[path.suffix.lower()] for path in files.values()}
        if len(builders) > 1:
            raise DataError(
                f"data.files: all files must have one format; got {sorted(builders)}. Convert them to one of these."
            )
        builder = builders.pop()
        try:
            loaded = load_dataset(builder, data_files={split: str(path) for split, path in files.items()})
        except Exception as exc:
            raise _bad_line_error(files.values(), builder) or DataError(
                f"data.files: could not load {sorted(map(str, files.values()))}: {type(exc).__name__}: {exc}."
            ) from None
        if builder == "csv" and any(split.data.column(c).null_count for split in loaded.values() for c in split.column_names):
            bad = _bad_line_error(files.values(), builder)  # pandas reads a row with fields missing as empty values
            if bad:
                raise bad
        return loaded
    folder = recipe.data_folder  # a local folder: `datasets` infers its format (imagefolder, csv ...)
    try:
        return load_dataset(str(folder) if folder else data.path, data.config, revision=data.revision)
    except Exception as exc:
        if folder:
            raise DataError(f"data.path: could not load the folder {folder}: {type(exc).__name__}: {exc}.") from None
        config = f" (config '{data.config}')" if data.config else ""
        raise DataError(
            f"data.path: could not load the dataset '{data.path}'{config}: {type(exc).__name__}: {exc}. "
            "Check the name and config; without access to the Hugging Face Hub, use local files (data.files) "
            "or a local folder (data.path: a folder of images, one sub-folder per class)."
        ) from None


def _bad_line_error(files, builder: str) -> DataError | None:
    """The first malformed line of the local files, as an error naming the file, the line and an excerpt (None
    when none is found, or the search itself fails: the caller's own message stands then)."""
    for path in files:
        try:
            found = _first_bad_csv_row(path) if builder == "csv" else _first_bad_json_line(path) if builder == "json" else None
        except Exception:  # an unreadable file, a CSV quote left open ...: no line to name
            found = None
        if found and found[0] == 0:
            return DataError(f"data.files: {path} {found[1]}: give it one JSON object per line, or remove it.")
        if found:
            number, problem, line = found
            excerpt = line if len(line) <= 80 else line[:77] + "..."
            return DataError(f"data.files: {path}, line {number}: {problem}: {excerpt!r}. Fix or remove that line.")
    return None


def _first_bad_json_line(path) -> tuple[int, str, str] | None:
    """JSON Lines (.jsonl, or a .json file whose lines are objects): the first line that is not a JSON object.
    A JSON document: where it stops parsing."""
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if not text.strip():
        return 0, "is empty", ""
    try:
        json.loads(text)
        return None  # one valid document
    except json.JSONDecodeError as whole:
        if not _json_lines(path, lines):
            number = min(whole.lineno, len(lines))
            return number, f"not valid JSON ({whole.msg}, column {whole.colno}; a file cut short?)", lines[number - 1]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return number, f"not a complete JSON object ({exc.msg}, column {exc.colno}; a line cut short?)", line
        if not isinstance(row, dict):
            return number, f"a JSON {type(row).__name__}, not an object of column values", line
    return None


def _json_lines(path, lines: list[str]) -> bool:
    """Whether a JSON file is JSON Lines: by its suffix, or by its first lines each holding an object."""
    if path.suffix.lower() == ".jsonl":
        return True
    starts = [line.strip() for line in lines[:20] if line.strip()]
    return len(starts) > 1 and sum(line.startswith("{") and line.endswith("}") for line in starts) > len(starts) // 2


def _first_bad_csv_row(path) -> tuple[int, str, str] | None:
    """The first row whose number of fields differs from the header's (the line where the row ends)."""
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)  # a long text cell is no error (pandas has no such limit)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        while header and not header[-1]:  # a trailing comma after the header: pandas reads no column there
            header = header[:-1]
        for row in reader:
            if len(row) > len(header) and not any(row[len(header):]):  # empty fields past the header's: none
                row = row[:len(header)]
            if header and row and len(row) != len(header):
                number, problem = reader.line_num, f"{len(row)} field{'s' * (len(row) != 1)} where the header has {len(header)}"
                break
        else:
            return None
    with open(path, encoding="utf-8", errors="replace") as f:
        line = next(line for n, line in enumerate(f, 1) if n == number)
    return number, problem, line.rstrip("\r\n")
