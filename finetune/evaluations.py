"""`finetune evaluate`: a finished run's model scored on new labelled data with the run's task and metrics.

The rows go through the task's predictor (the artifact loaded as its card loads it) and the run's own metric
modules with the run's options, so the run's test file scores exactly what the run's test evaluation did.
Each evaluation is kept as `evaluations/NAME.json` (metrics and predictions); `--update-card` adds it to the
card's results and its model-index (card.card_evaluations reads them back).
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.predict import INPUT_FORMATS, InputRow, artifact_of, open_predictor, predict_rows, task_of
from finetune.rundir import RunLayout, read_run


def evaluate_run(run_dir: Path, data: str, *, split: str, name: str | None, merged: bool = False, in_card: bool = False,
                 batch_size: int = 16, device: str = "cpu", skip_bad: bool = False) -> tuple[Path, dict, list[str]]:
    """Score the run on `data` (a csv / jsonl / parquet file, a folder, a Hub dataset id); write
    evaluations/NAME.json (`in_card`: shown in the card's results and model-index). Returns its path, the
    metrics and the messages of rows skipped as bad."""
    from finetune.api import PredictOptions
    from finetune.files import write_json
    from finetune.metrics import Metrics

    run = read_run(run_dir)
    name = name or _default_name(data, split)
    if not re.fullmatch(r"[\w.-]+", name):
        raise FinetuneError(f"--name '{name}': use letters, digits, '.', '-' and '_' (it names evaluations/NAME.json).")
    task = task_of(run)
    rows = labelled_rows(data, split, run.recipe.data.columns)
    predictor = open_predictor(run, artifact_of(run, merged=merged), PredictOptions(device=device, scores=True), task)
    metrics = Metrics(run.recipe.eval.metrics or task.default_metrics, predictor.metric_options())

    labelled, references, skipped = [], {}, []
    for row in rows:
        try:
            references[id(row)] = predictor.reference(row.row)
            labelled.append(row)
        except ValueError as exc:
            if not skip_bad:
                raise FinetuneError(f"{row.where}: {exc}. Fix or remove that row, or pass --skip-bad to leave it out.") from None
            skipped.append(f"{row.where}: {exc}")
    pairs, bad = predict_rows(predictor, labelled, batch_size=batch_size, skip_bad=skip_bad)
    skipped += bad
    if not pairs:
        raise FinetuneError(f"--data {data}: no row left to score.")
    predictions = [result["prediction"] for _, result in pairs]
    references = [references[id(row)] for row, _ in pairs]
    scores = [result["scores"] for _, result in pairs] if all("scores" in r for _, r in pairs) else None
    values = metrics.compute(predictions, references, scores)
    record = {"data": data, "dataset": _dataset_fields(data, split), "in_card": in_card, "artifact": "merged" if merged else "model",
              "examples": len(pairs), "skipped": skipped, "metrics": values, "predictions": predictions, "references": references}
    path = RunLayout(run.root).evaluations / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    write_json(path, record)
    return path, values, skipped


def labelled_rows(data: str, split: str, renames: dict[str, str]) -> list[InputRow]:
    """The split's rows, the recipe's column renames applied and class-label columns read as their names
    (a run's classes are names), each named by its line or row."""
    from datasets import ClassLabel, load_dataset

    from finetune.data import _bad_line_error
    from finetune.predict import _line_numbers

    path = Path(data)
    if path.suffix.lower() in INPUT_FORMATS and not path.is_file():
        raise FinetuneError(f"--data {data}: no such file. Give the path of a csv / jsonl / parquet file, a folder, "
                            "or a Hub dataset id.")
    builder = INPUT_FORMATS.get(path.suffix.lower()) if path.is_file() else None
    try:
        if builder:
            table = load_dataset(builder, data_files={split: str(path)}, split=split)
        else:
            table = load_dataset(data, split=split)
    except Exception as exc:
        bad = _bad_line_error([path], builder) if builder else None
        if bad:
            raise FinetuneError(f"--data {bad}") from None
        hint = ("" if path.exists() else " Give a csv / jsonl / parquet file, a local folder, or a Hub dataset id "
                "(the Hub needs a network).")
        raise FinetuneError(f"--data {data} (split '{split}'): could not load it ({type(exc).__name__}: {exc}).{hint}") from None
    missing = [src for src in renames if src not in table.column_names]
    if missing:
        raise FinetuneError(f"--data {data}: no column {', '.join(map(repr, missing))}, which the run's data.columns "
                            f"renames; its columns are {table.column_names}.")
    table = table.rename_columns({s: d for s, d in renames.items() if s != d})
    names = {c: f.names for c, f in table.features.items() if isinstance(f, ClassLabel)}
    sequences = {c: f.feature.names for c, f in table.features.items()  # a tag per word (CoNLL's ner_tags)
                 if isinstance(getattr(f, "feature", None), ClassLabel)}
    lines = _line_numbers(path, builder, len(table)) if builder else [f"row {i + 1}" for i in range(len(table))]
    where = str(path) if builder else f"{data} ({split})"
    rows = []
    for index, row in enumerate(table):
        for column, classes in names.items():
            row[column] = classes[row[column]] if row[column] is not None and row[column] >= 0 else None
        for column, classes in sequences.items():
            row[column] = [classes[v] for v in row[column]] if row[column] is not None else None
        rows.append(InputRow(f"{where} {lines[index]}", row))
    return rows


def _dataset_fields(data: str, split: str) -> dict:
    """The model-index `dataset` of an evaluation: a local file by its name, format and hash, else the folder or Hub id."""
    from finetune.provenance import _sha256

    path = Path(data)
    if path.is_file():
        return {"dataset_type": INPUT_FORMATS.get(path.suffix.lower(), "local"), "dataset_name": path.name,
                "dataset_split": split, "dataset_revision": f"sha256:{_sha256(path)}"}
    return {"dataset_type": path.name if path.is_dir() else data, "dataset_name": path.name if path.is_dir() else data,
            "dataset_split": split}


def _default_name(data: str, split: str) -> str:
    """A file's stem (reviews.csv: reviews); a folder's or a Hub dataset's name with the split (imdb-test)."""
    path = Path(data)
    name = path.stem if path.is_file() else f"{path.name}-{split}"
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "evaluation"
