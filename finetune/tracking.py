"""Experiment tracking (the recipe's `track` section) through accelerate's trackers: TensorBoard, MLflow, W&B ...

What the trackers receive, from the main process only:
- at the start, the resolved recipe as hyperparameters, flattened (`train.lr`), without the settings whose name
  says they hold a secret (`redaction.secret_setting`) and with every text passed through `redaction.redact`;
- every record of logs/steps.jsonl, handed over by `StepLog` as it writes the line, so the two cannot differ:
  `train/loss`, `train/lr`, `train/grad_norm`, `train/examples_per_s`, `train/epoch` at the log cadence, and
  `eval/<metric>` at every evaluation;
- at the end, metrics.json's final metrics as `final/<split>/<metric>`, then the card and its pictures where the
  tracker takes files (MLflow artifacts, W&B run files, TensorBoard text and images).

TensorBoard writes into <run dir>/logs/tracking, where W&B keeps its local files too. logs/trackers.json keeps
what continues each tracker's run (W&B's run id, MLflow's run id): a `--resume` passes it back, so the resumed
session logs into the same tracker runs. A tracker that fails (a server down, a rejected value) warns once and is
switched off for the rest of the session; the training goes on.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

# accelerate's trackers (accelerate.utils.LoggerType), listed here so that `finetune validate` checks names and
# packages without importing accelerate: name → (the module the tracker imports, the pip package providing it).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
EXTRA = ("tensorboard", "mlflow", "wandb")  # what `pip install 'finetune[track]'` installs
RUN_NAME_OPTION = {"wandb": "name", "mlflow": "run_name", "trackio": "name"}  # where a tracker takes the run's name


def unknown_tracker(name: str) -> str | None:
    """Why `name` is not a tracker, or None when it is one."""
    if name in TRACKERS:
        return None
    hint = difflib.get_close_matches(name, TRACKERS, n=1)
    suggestion = f"did you mean '{hint[0]}'? " if hint else ""
    return f"'{name}' is not a tracker accelerate supports; {suggestion}Supported: {', '.join(sorted(TRACKERS))}."


def missing_package(name: str) -> str | None:
    """The install command when the tracker's package is missing (accelerate would then quietly skip it)."""
    module, package = TRACKERS[name]
    if importlib.util.find_spec(module) is not None:
        return None
    extra = f" (or pip install 'finetune[track]' for {', '.join(EXTRA)})" if name in EXTRA else ""
    return (f"the {name} tracker needs the {package} package, which is not installed here; "
            f"pip install {package}{extra}, or remove {name} from track.report_to.")


def accelerator_arguments(report_to: list[str], logging_dir: Path) -> dict:
    """The Accelerator's tracking arguments: the trackers, and where those that write files write them."""
    return {"log_with": list(report_to), "project_dir": str(logging_dir)} if report_to else {}


def hyperparameters(recipe) -> dict:
    """The resolved recipe as flat `section.key` values of the types every tracker takes (str, int, float, bool).
    Settings named like secrets are left out, and texts are redacted."""
    import yaml

    from finetune.redaction import redact, secret_setting

    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if secret_setting(str(key)):
                continue
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float)):
                flat[prefix + str(key)] = value
            else:  # None, lists and empty sections as JSON: '["lora"]', 'null'
                flat[prefix + str(key)] = redact(value if isinstance(value, str) else json.dumps(value))

    walk(yaml.safe_load(recipe.to_yaml()), "")
    return flat


@contextlib.contextmanager
def tracked(accelerator, recipe, layout, resume: bool) -> Iterator[Tracking | None]:
    """The run's trackers, started on the main process once the run directory is written (None: no tracking in
    this process), and ended on the way out, whether the run finished or not."""
    tracking = _start(accelerator, recipe, layout, resume) if recipe.track.report_to and accelerator.is_main_process else None
    try:
        yield tracking
    finally:
        if tracking is not None:
            tracking.end()


class Tracking:
    """What a started run sends its trackers; every call goes through accelerate's trackers, guarded."""

    def __init__(self, accelerator, layout):
        self.accelerator, self.layout = accelerator, layout

    def log_record(self, record: dict) -> None:
        """A record of logs/steps.jsonl, as it is written: the same numbers, named train/… or eval/…."""
        if "eval" in record:
            values = {f"eval/{name}": value for name, value in record["eval"].items()}
        else:
            values = {f"train/{name}": value for name, value in record.items() if name != "step"}
        self.accelerator.log(_numbers(values), step=record["step"])

    def log_outputs(self, metrics: dict, step: int) -> None:
        """metrics.json's final metrics per split, then the card and its pictures where the tracker takes files."""
        final = {f"final/{split}/{name}": value for split, values in metrics.items() for name, value in values.items()}
        self.accelerator.log(_numbers(final), step=step)
        for tracker in self.accelerator.trackers:
            upload = _UPLOADS.get(tracker.name)
            if upload is not None:
                tracker.attempt(upload, tracker.wrapped, self.layout, step)

    def end(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _start(accelerator, recipe, layout, resume: bool) -> Tracking | None:
    from finetune.files import write_json

    track = recipe.track
    continued = _read_json(layout.trackers) if resume else None
    init = {name: {**_defaults(name, recipe, layout), **track.init.get(name, {}), **(continued or {}).get(name, {})}
            for name in track.report_to}
    # A continued tracker run has the hyperparameters already (and MLflow refuses a changed one: a new train.lr).
    config = hyperparameters(recipe) if continued is None else None
    layout.tracking.mkdir(parents=True, exist_ok=True)
    try:
        accelerator.init_trackers(track.project or recipe.name, config=config, init_kwargs=init)
    except Exception as exc:  # any tracker's own error: a server down, an option it does not take
        _warn(f"the trackers ({', '.join(track.report_to)}) could not start ({type(exc).__name__}: {exc}); the run goes "
              "on without tracking. Check the options under track.init and that the trackers' servers are reachable.")
        for tracker in accelerator.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers.clear()
        return None
    accelerator.trackers[:] = [_Guarded(tracker) for tracker in accelerator.trackers]
    write_json(layout.trackers, {**(continued or {}), **_continuations(accelerator)})
    return Tracking(accelerator, layout)


def _defaults(name: str, recipe, layout) -> dict:
    options = {RUN_NAME_OPTION[name]: recipe.track.run_name or layout.root.name} if name in RUN_NAME_OPTION else {}
    if name == "wandb":
        options["dir"] = str(layout.tracking)  # its local files stay in the run directory
    return options


def _continuations(accelerator) -> dict:
    """What continues each tracker's run on --resume, as the options its start takes."""
    found = {}
    for tracker in accelerator.trackers:
        run = accelerator.get_tracker(tracker.name, unwrap=True)
        if tracker.name == "wandb":
            found["wandb"] = {"id": run.id, "resume": "allow"}
        elif tracker.name == "mlflow":
            found["mlflow"] = {"run_id": run.info.run_id}
    return found


class _Guarded:
    """One of the Accelerator's trackers, wrapped: its first exception warns and switches it off, so that no tracker
    stops a run (accelerator.log would raise it, and skip the trackers after it)."""

    def __init__(self, tracker):
        self.wrapped, self.name, self.off = tracker, tracker.name, False

    @property
    def tracker(self):  # what accelerator.get_tracker(name, unwrap=True) returns
        return self.wrapped.tracker

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.attempt(self.wrapped.log, values, step=step, **kwargs)

    def finish(self) -> None:
        self.attempt(self.wrapped.finish)
        self.off = True  # finished once: accelerator.end_training finds nothing more to do

    def attempt(self, action, *args, **kwargs) -> None:
        if self.off:
            return
        try:
            action(*args, **kwargs)
        except Exception as exc:
            self.off = True
            _warn(f"the {self.name} tracker failed ({type(exc).__name__}: {exc}); the run goes on, without logging to "
                  f"{self.name} for the rest of this session.")


def _numbers(values: dict) -> dict:
    """The values a tracker can plot: a gradient norm an engine did not report (None) is left out."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _pictures(layout) -> list[Path]:
    return sorted(layout.images.glob("*.png")) if layout.images.is_dir() else []


def _to_mlflow(tracker, layout, step: int) -> None:
    tracker.log_artifact(str(layout.card))
    if _pictures(layout):
        tracker.log_artifacts(str(layout.images), "images")


def _to_wandb(tracker, layout, step: int) -> None:
    for path in [layout.card, *_pictures(layout)]:
        tracker.tracker.save(str(path), base_path=str(layout.root), policy="now")


def _to_tensorboard(tracker, layout, step: int) -> None:
    """TensorBoard takes no files: the card as text, its pictures as images."""
    import numpy as np
    from PIL import Image

    writer = tracker.tracker
    writer.add_text("card", layout.card.read_text(encoding="utf-8"), step)
    for path in _pictures(layout):
        with Image.open(path) as image:
            writer.add_image(f"card/{path.stem}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
    writer.flush()


_UPLOADS = {"mlflow": _to_mlflow, "wandb": _to_wandb, "tensorboard": _to_tensorboard}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _warn(message: str) -> None:
    from finetune.redaction import redact

    print(redact(f"finetune: {message}"), file=sys.stderr)
