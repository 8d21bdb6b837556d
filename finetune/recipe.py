"""The recipe: one YAML file that says what to fine-tune, on what, how, and where to write it.

Every key is declared and documented here, once. Unknown keys are errors (with a "did you
mean"), and all problems of a recipe are reported together, each with its key path and line.
Task- and method-specific `options` are validated by the plugin's own `Options` model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from finetune.errors import PluginError, RecipeError
from finetune.recipe_errors import describe_validation_error, line_index


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 3e-4 as a number (YAML 1.1 wants 3.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TaskSection(Section):
    name: str = Field(description="Task plugin name, from the `finetune.tasks` entry points (e.g. text-classification).")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the task plugin, checked by its own schema.")


class MethodSection(Section):
    name: str = Field(description="Method plugin name, from the `finetune.methods` entry points: feature-extraction, full, lora.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the method plugin, checked by its own schema.")


class ModelSection(Section):
    name: str = Field(
        description="The pretrained backbone: a Hub id (distilbert-base-uncased), a local directory "
        "(relative to the recipe's folder), or `package:PKG/SUBDIR` for a model shipped inside an "
        "installed Python package."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the pretrained weights are loaded in (auto: the checkpoint's own). The weights "
        "that train are kept in float32 whatever it is; bfloat16 or float16 halves the memory of the frozen ones "
        "(the base under LoRA and feature extraction)."
    )


class DataSection(Section):
    path: str | None = Field(
        None, description="Hub dataset id (nyu-mll/glue), a `datasets` builder name, or a local folder (relative to the recipe's "
        "folder) such as an image folder with one sub-folder per class; omit when `files` is given."
    )
    config: str | None = Field(None, description="Dataset configuration name (sst2).")
    revision: str | None = Field(None, description="Hub branch, tag or commit of the dataset.")
    files: dict[str, str] | None = Field(
        None, description="Local csv/json/jsonl/parquet files per split ({train: a.csv, test: b.csv}), relative to the recipe's folder."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename dataset columns to the names the task expects ({sentence: text})."
    )
    train_split: str = Field("train", description="Split to train on.")
    eval_split: str | None = Field("validation", description="Split to evaluate on during training; carved from train when the dataset has none.")
    test_split: str | None = Field("test", description="Split for a final held-out evaluation; skipped when the dataset has none.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of train carved (stratified, seeded) as the eval split when none exists.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training examples (a seeded random subset), for quick runs.")
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on eval and test examples.")
    deduplicate: Literal["none", "warn", "drop-from-eval", "error"] = Field(
        "warn", description="What a run does with eval / test examples that also appear in train, exactly or nearly "
        "(the leakage audit): warn prints a warning, drop-from-eval removes them from eval / test before training, error "
        "stops before any model is loaded, none skips the audit."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if not self.path and not self.files:
            raise ValueError("give either `path` (a Hub dataset) or `files` (local files per split)")
        if self.path and self.files:
            raise ValueError("give either `path` or `files`, not both")
        if self.eval_split is not None and self.eval_split == self.test_split:
            raise ValueError(
                f"eval_split and test_split are both '{self.eval_split}': early stopping and the best-model choice "
                "would select on the test set, and its score would no longer be held out. Set data.eval_split to "
                "another split, or to null to carve one from train (data.eval_fraction)"
            )
        return self


# Metric names (or name endings, as in eval_loss) for which a smaller value is better.
LOWER_IS_BETTER = ("loss", "error", "perplexity", "mse", "mae", "rmse", "wer", "cer")


def lower_is_better(metric: str) -> bool:
    return any(metric == name or metric.endswith(f"_{name}") for name in LOWER_IS_BETTER)


class EarlyStopping(Section):
    metric: str = Field(description="Metric to watch, as named in metrics.json (accuracy, f1, loss).")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before training stops.")
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether a larger or a smaller value is better; default: min for loss and other "
        "lower-is-better names (error, perplexity, mse, mae, rmse, wer, cer), max otherwise."
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    final_model: Literal["best", "last"] = Field(
        "best", description="Which weights the run saves, tests and describes in the card: the best evaluation's "
        "(its checkpoint is kept out of rotation) or the last step's."
    )

    @property
    def minimise(self) -> bool:
        return self.mode == "min" if self.mode else lower_is_better(self.metric)


class TrainSection(Section):
    epochs: int = Field(3, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per device per forward pass.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per device per evaluation forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; never applied to biases and normalisation weights.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null disables clipping.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of all steps spent warming up linearly.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast precision (fp16 needs a GPU); frozen modules (a frozen backbone, a VAE) are then stored in it too."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of storing them: much less activation "
        "memory for about 20-30% more step time. Same loss and gradients."
    )
    distributed_timeout_minutes: float = Field(
        30, gt=0, description="How long a process waits for the others at a collective (NCCL/gloo timeout) before the run fails."
    )
    seed: int = Field(42, description="Seeds data order, initialisation and dropout: the same recipe gives the same run.")
    log_every_steps: int = Field(10, ge=1, description="Write a line to logs/steps.jsonl every N optimizer steps (and at each checkpoint).")
    dataloader_workers: int = Field(
        0, ge=0, description="Worker processes that load and transform batches (image decoding, augmentation); 0 loads in the training process."
    )


class EvalSection(Section):
    metrics: list[str] | None = Field(
        None, description="Metric names (accuracy, f1, precision, recall, matthews_correlation, or a Hub metric); default: the task's."
    )
    every_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps; null evaluates at the end of each epoch.")
    early_stopping: EarlyStopping | None = Field(None, description="Stop when a metric stops improving.")


class CheckpointSection(Section):
    every_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps; null saves after each evaluation.")
    keep_last: int = Field(2, ge=1, description="How many checkpoints to keep (oldest are deleted).")


class OutputSection(Section):
    dir: str | None = Field(None, description="Run directory, relative to the working directory; default runs/<name>.")
    merged: bool = Field(False, description="For adapter methods (LoRA), also write the merged model to model-merged/.")


class CardSection(Section):
    license: str | None = Field(None, description="License of the fine-tuned model, for the card (apache-2.0, mit ...).")
    tags: list[str] = Field(default_factory=list, description="Extra tags for the card.")


class HubSection(Section):
    push: bool = Field(False, description="Push the model, its card and pictures to the Hugging Face Hub after the run.")
    repo_id: str | None = Field(None, description="Repo to push to (`user/name` or `org/name`); required when push is true.")
    private: bool | None = Field(
        None, description="Create the repo private (true) or public (false); null: the account's default. An existing repo keeps its visibility."
    )
    revision: str = Field("main", description="Branch to commit to; created from main when missing.")
    artifacts: Literal["adapter", "merged", "both"] = Field(
        "adapter", description="Adapter methods (LoRA): push the adapter, the merged model, or both (merged at the root, the adapter in adapter/)."
    )
    include: list[Literal["logs", "checkpoints", "metrics"]] = Field(
        default_factory=list,
        description="Run files to push as well: logs (logs/), checkpoints (checkpoints/, with optimizer states), "
        "metrics (metrics.json, predictions.json).",
    )
    commit_message: str | None = Field(None, description="Commit message; default: `finetune: <run directory name>`.")

    @model_validator(mode="after")
    def _target(self) -> HubSection:
        if self.repo_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.repo_id)
            except HFValidationError as exc:
                raise ValueError(f"repo_id '{self.repo_id}' is not a valid Hub repo id: {exc}") from None
        elif self.push:
            raise ValueError("push is true but repo_id is missing; set hub.repo_id: user/name")
        return self


class TrackSection(Section):
    report_to: list[str] = Field(
        default_factory=list, description="Experiment trackers to log to, through accelerate: tensorboard, mlflow, wandb, "
        "comet_ml, aim, clearml, dvclive, swanlab, trackio. Empty: no tracking, and no tracker is imported."
    )
    project: str | None = Field(None, description="Project (experiment) name in the trackers; default: the recipe's name.")
    run_name: str | None = Field(None, description="This run's name in the trackers; default: the run directory's name.")
    init: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options per tracker, passed to its start (accelerate's init_kwargs), e.g. "
        "{wandb: {entity: my-team, tags: [lora]}, mlflow: {tags: {team: nlp}}}."
    )

    @field_validator("report_to")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from finetune.tracking import unknown_tracker

        for name in names:
            problem = unknown_tracker(name)
            if problem:
                raise ValueError(problem)
        return list(dict.fromkeys(names))

    @field_validator("init")
    @classmethod
    def _no_secrets(cls, init: dict) -> dict:
        from finetune.redaction import secret_setting

        for tracker, options in init.items():
            secret = next((key for key in options if secret_setting(str(key))), None)
            if secret:
                raise ValueError(
                    f"'{tracker}.{secret}' would put a secret into the recipe, of which the run directory keeps a copy "
                    f"(and a push publishes it). Remove it, and give it to {tracker} through its own login or environment "
                    "variable (wandb login, WANDB_API_KEY, COMET_API_KEY, MLFLOW_TRACKING_TOKEN ...)."
                )
        return init

    @model_validator(mode="after")
    def _init_of_used_trackers(self) -> TrackSection:
        unused = sorted(set(self.init) - set(self.report_to))
        if unused:
            raise ValueError(f"init has options for {', '.join(unused)}, which report_to does not name; "
                             f"add {unused[0]} to track.report_to or remove track.init.{unused[0]}")
        return self


class Recipe(Section):
    name: str = Field(description="Name of the run and of the resulting model.")
    task: TaskSection
    model: ModelSection
    data: DataSection
    method: MethodSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    output: OutputSection = Field(default_factory=OutputSection)
    card: CardSection = Field(default_factory=CardSection)
    hub: HubSection = Field(default_factory=HubSection)
    track: TrackSection = Field(default_factory=TrackSection)

    # Where the recipe file lives (relative data and model paths are resolved against it), and
    # the plugins' validated options: set by load_recipe, never read from the file.
    _base_dir: Path = PrivateAttr(default=Path("."))
    _task_options: Any = PrivateAttr(default=None)
    _method_options: Any = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def task_options(self):
        return self._task_options

    @property
    def method_options(self):
        return self._method_options

    @property
    def writes_merged(self) -> bool:
        """Whether an adapter run also writes model-merged/: asked for, or needed by the push."""
        return self.output.merged or (self.hub.push and self.hub.artifacts != "adapter")

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir or Path("runs") / self.name)

    @property
    def data_folder(self) -> Path | None:
        """`data.path` as a local folder, when it names one (relative to the recipe's folder)."""
        if not self.data.path:
            return None
        folder = self.resolve(self.data.path)
        return folder.resolve() if folder.is_dir() else None

    def resolve(self, relative: str) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def to_yaml(self) -> str:
        """The resolved recipe, plugin options included with their defaults."""
        data = self.model_dump(mode="json")
        for kind in ("task", "method"):
            options = getattr(self, f"{kind}_options")
            if options is not None:
                data[kind]["options"] = options.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` overrides; the value is parsed as a YAML scalar and may contain '='."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
            continue
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {key}: '{part}' is a value, not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = parse_yaml(value) if value.strip() else ""
            except yaml.YAMLError as exc:
                problems.append(f"--set {key}: the value {value!r} is not valid YAML ({exc.problem}); quote it")
    if problems:
        raise RecipeError(problems, "the command line")
    return raw


def read_recipe_file(path: Path) -> tuple[dict, dict]:
    """Parse YAML safely; return the mapping and a key-path → line index for messages."""
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"], str(path)) from None
    try:
        raw = parse_yaml(text)
        lines = line_index(text)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["the recipe must be a mapping of sections (task, model, data, method, ...)"], str(path))
    return raw, lines


def load_recipe(path: str | Path, overrides: list[str] = (), *, cross_check: bool = True) -> Recipe:
    """Read, override, and validate a recipe, including its plugins' options.

    Raises RecipeError listing every problem found, each with its key path. `cross_check=False`
    skips the file-system checks: a run directory's recipe copy is read where its data may be gone.
    """
    from finetune import plugins

    path = Path(path)
    raw, lines = read_recipe_file(path)
    raw = apply_overrides(raw, list(overrides))
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
        recipe._base_dir = path.resolve().parent
    except Exception as exc:  # pydantic.ValidationError; imported lazily
        problems += describe_validation_error(exc, Recipe, lines)

    # Plugin names and options are checked even when other sections have problems.
    for kind, group in (("task", plugins.TASKS), ("method", plugins.METHODS)):
        section = raw.get(kind)
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            continue
        try:
            plugin = plugins.load(group, section["name"])
        except Exception as exc:  # PluginError
            problems.append(f"{kind}.name: {exc}" + _at(lines, (kind, "name")))
            continue
        try:
            options = plugin.Options.model_validate(section.get("options") or {})
        except Exception as exc:
            problems += describe_validation_error(exc, plugin.Options, lines, prefix=(kind, "options"))
            continue
        if recipe is not None:
            setattr(recipe, f"_{kind}_options", options)

    if recipe is not None and cross_check:
        problems += cross_checks(recipe, lines)
    if problems:
        raise RecipeError(problems, str(path))
    return recipe


def cross_checks(recipe: Recipe, lines: dict) -> list[str]:
    """Checks that need several sections or the file system: plugins agree, data files exist."""
    from finetune import plugins

    problems = []
    try:
        task_cls = plugins.load(plugins.TASKS, recipe.task.name)
    except PluginError:
        task_cls = None  # already reported
    supported = getattr(task_cls, "methods", None)
    if supported is not None and recipe.method.name not in supported:
        problems.append(
            f"method.name: the task '{recipe.task.name}' does not support the method '{recipe.method.name}'; "
            f"it supports: {', '.join(supported)}" + _at(lines, ("method", "name"))
        )
    for split, file in (recipe.data.files or {}).items():
        resolved = recipe.resolve(file)
        if not resolved.is_file():
            problems.append(f"data.files.{split}: file not found: {resolved}" + _at(lines, ("data", "files", split)))
        elif resolved.suffix.lower() not in DATA_FORMATS:
            problems.append(
                f"data.files.{split}: cannot read '{resolved.suffix}' files; use one of {', '.join(sorted(DATA_FORMATS))}"
                + _at(lines, ("data", "files", split))
            )
    path = recipe.data.path
    if path and path.startswith((".", "/", "~")) and recipe.data_folder is None:
        problems.append(
            f"data.path: the local folder '{recipe.resolve(path)}' does not exist (relative paths start at the "
            "recipe's folder)" + _at(lines, ("data", "path"))
        )
    if recipe.data.files is not None and recipe.data.train_split not in recipe.data.files:
        problems.append(
            f"data.files: no file for the train split '{recipe.data.train_split}'; "
            f"add data.files.{recipe.data.train_split} or set data.train_split to one of {sorted(recipe.data.files)}"
        )
    if recipe.hub.artifacts != "adapter":
        try:
            adapter = plugins.load(plugins.METHODS, recipe.method.name).produces_adapter
        except PluginError:
            adapter = True  # already reported
        if not adapter:
            problems.append(
                f"hub.artifacts: '{recipe.hub.artifacts}' applies to adapter methods (lora); the method "
                f"'{recipe.method.name}' saves a whole model. Remove hub.artifacts." + _at(lines, ("hub", "artifacts"))
            )
    problems += _tracker_packages(recipe, lines)
    problems += _method_requirements(recipe, lines)
    if task_cls is not None and not problems:  # the model is built from its config only when the rest holds
        problems += _adapter_problems(recipe, lines)
    stop = recipe.eval.early_stopping
    metrics = recipe.eval.metrics or getattr(task_cls, "default_metrics", None)
    # finetune's own metrics report one result named as they are; the results of a plugin's
    # metric ('entities' reports entity_f1 ...) are known only at the first evaluation.
    own = {name for name, ep in plugins.available(plugins.METRICS).items() if ep.dist and ep.dist.name == "finetune"}
    if stop is not None and metrics is not None and set(metrics) <= own and stop.metric not in [*metrics, "loss"]:
        problems.append(
            f"eval.early_stopping.metric: '{stop.metric}' is not computed; choose one of {[*metrics, 'loss']}"
            + _at(lines, ("eval", "early_stopping", "metric"))
        )
    return problems


def _adapter_problems(recipe: Recipe, lines: dict) -> list[str]:
    """Targets the recipe names that adapt nothing in a component it trains (finetune/adapters.py)."""
    from finetune.adapters import validate_adapters

    return [problem + _at(lines, ("method", "options")) for problem in validate_adapters(recipe)]


def _method_requirements(recipe: Recipe, lines: dict) -> list[str]:
    """What the method's options need that this machine lacks (QLoRA: bitsandbytes)."""
    from finetune import plugins

    if recipe.method_options is None:
        return []  # the options were refused: already reported
    try:
        method = plugins.load(plugins.METHODS, recipe.method.name)(recipe.method_options)
    except (PluginError, AttributeError):
        return []  # already reported
    return [problem + _at(lines, ("method", "options")) for problem in method.missing_requirements()]


def _tracker_packages(recipe: Recipe, lines: dict) -> list[str]:
    """Trackers whose package is missing: accelerate would silently log nothing to them."""
    from finetune.tracking import missing_package

    where = _at(lines, ("track", "report_to"))
    return [f"track.report_to: {problem}{where}" for problem in map(missing_package, recipe.track.report_to) if problem]


# Local file suffix → `datasets` builder.
DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _at(lines: dict, path: tuple) -> str:
    line = lines.get(tuple(path))
    return f" (line {line})" if line else ""
