"""Using a finished run's model: `finetune predict`, the rows `finetune evaluate` scores, and the round trip
checked before a push.

The task's predictor (`Task.predictor`) loads an artifact the way its card's snippet does and predicts;
this module opens the run, reads the inputs (command-line values, a folder of images, a csv / jsonl /
parquet file), batches them behind a progress bar, names a bad input by its argument or line, and writes
the results atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import plugins
from finetune.errors import FinetuneError
from finetune.rundir import RunLayout, read_run

if TYPE_CHECKING:
    from finetune.api import Artifact, BasePredictor, PredictOptions, RunRecord

INPUT_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ROUND_TRIP_EXAMPLES = 4


@dataclass
class InputRow:
    where: str
    """What names the input in a message: `argument 2`, `reviews.csv line 14`."""
    row: dict
    shown: Any = None
    """What the output's `input` shows: the text, the file or the prompt (default: `where`)."""


def task_of(run: RunRecord):
    """The run's task plugin, built with the run's own options."""
    return plugins.load(plugins.TASKS, run.recipe.task.name)(run.recipe.task_options)


def artifact_of(run: RunRecord, *, merged: bool = False) -> Artifact:
    """The run's model/ (its adapter, for an adapter method), or with `merged` its model-merged/."""
    from finetune.api import Artifact
    from finetune.card import method_of

    layout = RunLayout(run.root)
    if not merged:
        return Artifact(str(layout.model), adapter=method_of(run).produces_adapter)
    if not layout.merged.is_dir():
        raise FinetuneError(f"--merged: {layout.merged} does not exist. Write it with `finetune export {run.root} --merged`, "
                            "or predict with the adapter (leave out --merged).")
    return Artifact(str(layout.merged), adapter=False)


def run_and_artifact(source: str, *, revision: str | None = None, merged: bool = False) -> tuple[RunRecord, Artifact]:
    """What `finetune predict SOURCE` uses: a run directory, or a Hub repo that `finetune push` wrote (downloaded
    into the Hub cache; its .finetune/ holds the run's recipe and metrics.json)."""
    if Path(source).exists():
        if revision:
            raise FinetuneError(f"--revision {revision}: {source} is a run directory; --revision is for a Hub repo id.")
        run = read_run(Path(source))
        return run, artifact_of(run, merged=merged)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
        namespaced = source.count("/") == 1
    except HFValidationError:
        namespaced = False
    if not namespaced:
        raise FinetuneError(f"{source} is neither a run directory nor a Hub repo id (user/name). Check the path.")
    from finetune.api import Artifact, RunRecord
    from finetune.hub import RECIPE, SUMMARY, download_pushed
    from finetune.rundir import run_recipe

    folder, where = download_pushed(source, revision, merged=merged)
    summary = json.loads((folder / SUMMARY).read_text())
    run = RunRecord(root=folder, recipe=run_recipe(folder / RECIPE, summary), summary=summary, predictions={}, steps=[])
    return run, Artifact(str(folder / where["subfolder"]), adapter=where["adapter"])


def open_predictor(run: RunRecord, artifact: Artifact, options: PredictOptions, task=None) -> BasePredictor:
    predictor = (task or task_of(run)).predictor(run, artifact, options)
    if predictor is None:
        raise FinetuneError(f"the task '{run.recipe.task.name}' of {run.root} does not predict: its plugin has no "
                            "`predictor` member (see docs/writing-a-plugin.md).")
    return predictor


# -- inputs ---------------------------------------------------------------------------------
def command_line_rows(values: list[str], column: str) -> list[InputRow]:
    """Each value as `{column: value}`; a folder stands for the image files in it (sorted, recursively)."""
    rows = []
    for number, value in enumerate(values, 1):
        folder = Path(value)
        if folder.is_dir():
            images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise FinetuneError(f"argument {number}: the folder {folder} holds no image files "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
            rows += [InputRow(str(p), {column: str(p)}, str(p)) for p in images]
        else:
            rows.append(InputRow(f"argument {number}", {column: value}, value))
    return rows


def file_rows(path: Path, column: str | None, wanted: str) -> list[InputRow]:
    """The rows of a csv / jsonl / parquet file, read with `datasets`, its `column` (default: `wanted`)
    renamed to the predictor's column `wanted`. Relative image paths are taken from the file's folder."""
    from datasets import load_dataset

    from finetune.data import _bad_line_error

    builder = INPUT_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise FinetuneError(f"--input-file {path}: give a {', '.join(INPUT_FORMATS)} file.")
    if not path.is_file():
        raise FinetuneError(f"--input-file {path}: no such file.")
    try:
        table = load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        bad = _bad_line_error([path], builder)
        raise FinetuneError(f"--input-file {bad}" if bad else
                            f"--input-file {path}: could not read it ({type(exc).__name__}: {exc}).") from None
    source = column or wanted
    if source not in table.column_names:
        hint = "" if column else f" Name the column that holds the inputs with --column (one of {table.column_names})."
        raise FinetuneError(f"--column: {path} has no column '{source}'; its columns are {table.column_names}.{hint}")
    if source != wanted:
        table = table.remove_columns([c for c in table.column_names if c == wanted]).rename_column(source, wanted)
    lines = _line_numbers(path, builder, len(table))
    rows = []
    for index, row in enumerate(table):
        value = row[wanted]
        if isinstance(value, str) and wanted == "image" and not Path(value).is_absolute():
            value = str(path.parent / value)
        rows.append(InputRow(f"{path} {lines[index]}", {**row, wanted: value}, value if isinstance(value, str) else None))
    return rows


def _line_numbers(path: Path, builder: str, count: int) -> list[str]:
    """Where each row of the file starts, as a reader finds it in an editor (blank lines are no rows)."""
    if builder == "parquet":
        return [f"row {i + 1}" for i in range(count)]
    if builder == "json" and path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            starts = [n for n, line in enumerate(f, 1) if line.strip()]
    elif builder == "csv":
        import csv

        starts = []
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            next(reader, None)
            line = reader.line_num + 1
            for fields in reader:
                if fields:
                    starts.append(line)
                line = reader.line_num + 1
    else:  # one JSON document: no line per row
        return [f"row {i + 1}" for i in range(count)]
    return [f"line {n}" for n in starts] if len(starts) == count else [f"row {i + 1}" for i in range(count)]


# -- predicting -------------------------------------------------------------------------------
def predict_rows(predictor: BasePredictor, rows: list[InputRow], *, batch_size: int, skip_bad: bool,
                 progress: bool = True) -> tuple[list[tuple[InputRow, dict]], list[str]]:
    """(row, result) for each row predicted, in order, and the messages of the inputs skipped as bad. A bad
    input stops everything before any result is written, unless `skip_bad`."""
    from tqdm.auto import tqdm

    results, skipped, batch = [], [], []

    def flush():
        results.extend(zip([row for row, _ in batch], predictor.predict([value for _, value in batch])))
        batch.clear()

    with tqdm(total=len(rows), desc="Predicting", unit="input", disable=not progress or len(rows) < 2 * batch_size) as bar:
        for row in rows:
            try:
                batch.append((row, predictor.read(row.row)))
            except ValueError as exc:
                if not skip_bad:
                    raise FinetuneError(f"{row.where}: {exc}. Fix or remove that input, or pass --skip-bad to leave bad "
                                        "inputs out (each is reported).") from None
                skipped.append(f"{row.where}: {exc}")
            if len(batch) == batch_size:
                flush()
            bar.update(1)
        if batch:
            flush()
    return results, skipped


def output_records(results: list[tuple[InputRow, dict]]) -> list[dict]:
    """What `finetune predict` writes: each result after the input it is for."""
    return [{"input": row.where if row.shown is None else row.shown, **result} for row, result in results]


def write_jsonl(path: Path, results: list[dict]) -> None:
    from finetune.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))


# -- the run's own examples --------------------------------------------------------------------
def run_examples(run: RunRecord, task, limit: int | None = None) -> tuple[str, list[dict], list]:
    """The run's test split (else eval) rebuilt as the run evaluated it (same renames, checks, carving and
    caps), and the run's own predictions for its rows: (split, rows, predictions), the first `limit` of them.
    Raises FinetuneError when the data cannot be rebuilt as it was."""
    from finetune.data import finish_splits, load_splits
    from finetune.provenance import describe_data

    recipe = run.recipe
    try:
        splits = finish_splits(task.prepare_data(load_splits(recipe)), recipe, task.stratify_column)
        recorded = run.summary.get("data", {}).get("files")
        if recorded:
            now = describe_data(recipe, splits, eval_carved=False, task_facts={})["files"]
            changed = [s for s in recorded if recorded[s]["sha256"] != now.get(s, {}).get("sha256")]
            if changed:
                raise FinetuneError(f"data.files: the {', '.join(changed)} file changed since the run")
    except FinetuneError:
        raise
    except Exception as exc:
        raise FinetuneError(f"{type(exc).__name__}: {exc}") from None
    for split in ("test", "eval"):
        if split in splits and split in run.predictions:
            count = len(splits[split]) if limit is None else min(limit, len(splits[split]))
            return split, [splits[split][i] for i in range(count)], run.predictions[split]["predictions"][:count]
    raise FinetuneError("the run has no test or eval predictions to compare with")


def check_round_trip(run: RunRecord, artifacts: list[Artifact], *, device: str = "cpu",
                     limit: int = ROUND_TRIP_EXAMPLES) -> tuple[list[str], list[str]]:
    """Reload each local artifact the way its card does (the predictor's code) and predict a few of the run's
    own examples. Returns (problems: each artifact that disagrees with the run's predictions, naming the first
    difference; warnings: what could not be checked, such as data that is gone)."""
    import tempfile

    from finetune.api import PredictOptions

    task = task_of(run)
    problems, warnings = [], []
    examples = None  # the run's examples, rebuilt once for every artifact
    for artifact in artifacts:
        with tempfile.TemporaryDirectory() as files:
            predictor = task.predictor(run, artifact, PredictOptions(device=device, files_dir=Path(files)))
            if predictor is None:
                return [], [f"the task '{run.recipe.task.name}' has no predictor: its artifacts were not reloaded"]
            pairs = predictor.references(run, limit)
            if pairs is None:
                try:
                    examples = examples or run_examples(run, task, limit)
                except FinetuneError as exc:
                    warnings.append(f"{artifact.location} was not reloaded: the run's examples cannot be rebuilt ({exc}).")
                    continue
                split, rows, expected = examples
                pairs = [(InputRow(f"{split} example {i}", row), e) for i, (row, e) in enumerate(zip(rows, expected))]
            else:
                pairs = [(InputRow(f"sample {i}", row), e) for i, (row, e) in enumerate(pairs)]
            if not pairs:
                warnings.append(f"{artifact.location} was not reloaded: the run has no examples to compare with.")
                continue
            results, _ = predict_rows(predictor, [row for row, _ in pairs], batch_size=limit, skip_bad=False, progress=False)
            for (row, expected), (_, result) in zip(pairs, results):
                if not predictor.agrees(expected, result["prediction"]):
                    problems.append(f"{artifact.location}, loaded the way its card says, predicts {result['prediction']!r} for "
                                    f"the run's {row.where} where the run predicted {expected!r}")
                    break
    return problems, warnings


# -- the command --------------------------------------------------------------------------------
def predict_command(source: str, values: list[str], input_file: Path | None, column: str | None,
                    output: Path | None, options: PredictOptions, *, merged: bool, batch_size: int,
                    skip_bad: bool, revision: str | None = None) -> tuple[list[dict], list[str], Path | None]:
    """`finetune predict`: the output records, the skipped inputs' messages and the folder of files made.
    Nothing is written until every input is predicted; then the output (and its folder) replace old ones at once."""
    import tempfile

    from finetune.files import commit, remove, temporary_path

    run, artifact = run_and_artifact(source, revision=revision, merged=merged)
    predictor = open_predictor(run, artifact, options)
    rows = file_rows(input_file, column, predictor.column) if input_file else command_line_rows(values, predictor.column)
    files = output.with_suffix("") if output is not None else None
    made = temporary_path(files) if files is not None else Path(tempfile.mkdtemp()) / "files"
    remove(made)
    made.mkdir(parents=True)
    try:
        options.files_dir = made
        results, skipped = predict_rows(predictor, rows, batch_size=batch_size, skip_bad=skip_bad)
        records = output_records(results)
        if any(made.iterdir()):
            if files is None:
                raise FinetuneError("this task makes files: name where the results go with --output FILE.jsonl "
                                    "(the files go into the folder FILE/).")
            commit(made, files)
        else:
            files = None  # a task that makes no files
        if output is not None:
            write_jsonl(output, records)
    finally:
        remove(made)
    return records, skipped, files
