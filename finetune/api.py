"""The plugin contract: everything a task or method plugin author needs, on one screen.

A plugin is a class, registered under an entry point (a metric is an `evaluate` module):

    [project.entry-points."finetune.tasks"]
    my-task = "my_package.task:MyTask"

    [project.entry-points."finetune.methods"]
    my-method = "my_package.method:MyMethod"

    [project.entry-points."finetune.metrics"]
    my_metric = "my_package.my_metric"

The core creates one instance per run, passing the plugin's validated `Options`, and calls
the members below in this order. A task knows its data, its model and its loss; a method
knows how to make a model trainable. Neither knows the other's internals: a method sees a
`TaskModel`, which names the head modules, the frozen ones and the modules an adapter may target.

Optional members have their default in `BaseTask` / `BaseMethod`. A plugin may inherit them (or a
public task base such as `finetune.transformers_models.TransformersClassifier`); one that does not
gets them all the same: the registry adds the base class when it loads the plugin.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict
    from PIL import Image


@dataclass
class TaskModel:
    """What a task builds: the model and the facts a method needs about it."""

    model: torch.nn.Module
    head: list[str]
    """Qualified names of the modules that are new for this task (a classifier): always trained and saved."""
    adapter_targets: list[str]
    """The modules an adapter method (LoRA) may target when the recipe names none: the attention
    projections of a transformer, the convolutions of a CNN. Names as peft matches them (suffixes)."""
    frozen: list[str] = field(default_factory=list)
    """Qualified names of pretrained modules that are never trained (a diffusion pipeline's VAE and
    text encoder): the core freezes them after any method's `prepare`, holds them in eval mode and
    keeps them out of the optimizer; a method should not put adapters inside them."""
    hub_id: str | None = None
    """The Hub repo the pretrained weights came from, when model.name does not say it plainly
    (timm's `resnet50.a1_in1k` is `timm/resnet50.a1_in1k`); None: model.name, unless it is local."""
    components: list[str] = field(default_factory=list)
    """Qualified names of the parts an adapter must reach each on its own (a pipeline's `unet` and
    `text_encoder`): `finetune check` reports an adapter whose targets match nothing in a component that
    is not frozen. Empty: the model as a whole."""
    example_inputs: Callable[[int], dict] | None = None
    """Only from `build_skeleton`: batch size → the keyword arguments of one training forward of the model on a
    batch at the recipe's largest size (token ids of max_length, images at the input size), as meta tensors; the
    memory estimate counts what autograd keeps of that forward. None: activations are not estimated."""


@dataclass
class CardInfo:
    """What a task contributes to the model card of one artifact."""

    pipeline_tag: str
    library_name: str
    """The library that loads the artifact (transformers, peft, timm, diffusers): the Hub's `library_name`."""
    usage: str
    """A Python snippet that loads exactly the artifact with the ecosystem's own API."""
    description: str = ""
    """What the model does, completing "It ..." (e.g. "classifies text into 2 classes: neg, pos")."""
    tags: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    """Markdown blocks shown after the results (per-class tables, sample grids). Pictures are written
    to `run.images_dir` and embedded as `![caption](images/NAME.png)`."""
    data_sections: list[str] = field(default_factory=list)
    """Markdown blocks shown in the card's Data section, after the sources (a label count per split)."""
    template: str | None = None
    """Path of the plugin's own Jinja template, used instead of cards/model_card.md."""
    limitations: list[str] = field(default_factory=list)
    """Task-specific notes for the card's Limitations, after the core's (e.g. images skipped as unreadable)."""


@dataclass(frozen=True)
class Artifact:
    """A saved model as a card's usage snippet loads it."""

    location: str
    """A local directory or a Hub repo id."""
    adapter: bool
    """An adapter (LoRA) on top of the base model rather than a whole model."""
    subfolder: str | None = None
    """The folder inside `location` that holds it (a Hub repo with both an adapter and a merged model)."""

    def loader_arguments(self) -> str:
        """The arguments a `from_pretrained` call in a card snippet takes to load it: `"RUN/model"`,
        or `"user/repo", subfolder="adapter"`."""
        import json

        return json.dumps(self.location) + (f', subfolder="{self.subfolder}"' if self.subfolder else "")


@dataclass
class ExportInputs:
    """A batch the trained model takes, for exporting it to ONNX (`finetune export --onnx`)."""

    tensors: dict[str, torch.Tensor]
    """The model's inputs as keyword arguments of its `forward`, built as the task builds its eval batches."""
    dynamic: dict[str, dict[int, str]]
    """The dimensions that vary per input, named: {"input_ids": {0: "batch", 1: "sequence"}}."""


@dataclass
class RunRecord:
    """A finished run as its directory holds it: what a card is rendered from, without retraining."""

    root: Path
    recipe: Any
    """The run's resolved recipe (finetune.recipe.Recipe), plugin options validated."""
    summary: dict
    """metrics.json: metrics per split, history, parameters, data and environment facts."""
    predictions: dict
    """predictions.json: per split, `predictions` and `references` as the task's eval_step returned them."""
    steps: list[dict]
    """logs/steps.jsonl: training-loss records and evaluation records, in order."""

    @property
    def task_facts(self) -> dict:
        """What the task recorded about the data (Task.data_facts): its class names, counts, skipped rows."""
        return self.summary.get("data", {}).get("task", {})

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def samples_dir(self) -> Path:
        """What `Task.write_samples` wrote (a generator's images for fixed prompts)."""
        return self.root / "samples"


@dataclass
class PredictOptions:
    """How `finetune predict` (and the check before a push) asks a task's predictor to predict."""

    device: str = "cpu"
    top_k: int = 1
    """Classifiers: how many of the best classes each prediction lists."""
    scores: bool = False
    """Also return `scores`, the per-class scores eval_step returns (the logits), for ranking metrics."""
    files_dir: Path | None = None
    """Where a predictor that makes files (images) writes them; their names go in its results."""
    seed: int = 0
    """Generators: the seed of the first input without a `seed` of its own (the next get seed+1, ...)."""
    steps: int | None = None
    """Generators: denoising steps; None: the run's own sample settings."""
    guidance: float | None = None
    """Generators: classifier-free guidance scale; None: the run's own sample settings."""


class BasePredictor:
    """What `Task.predictor` returns: the run's artifact loaded the way its card's snippet loads it, and a
    `predict` over inputs read one by one. Subclass it and give `column`, `read` and `predict`."""

    column: ClassVar[str] = "text"
    """The input column: command-line inputs become rows `{column: value}`, `--column C` renames a file's C to it."""

    def read(self, row: dict) -> Any:
        """One input row (`{column: value, ...}`, from the command line, an input file or the run's data) → what
        `predict` takes. Raise ValueError saying what is wrong with it (an empty text, an unreadable image): the
        core reports it with the input's line and skips it or stops, as the user asked."""
        raise NotImplementedError

    def predict(self, inputs: list) -> list[dict]:
        """One JSON-able dict per input. `prediction` holds what the run's eval_step predicted for that input
        (a class id, a list of tags): `finetune predict` is tested, and every push checked, against the run's
        predictions.json. Add what a reader wants (`label`, `score`, `top_k`, the file made)."""
        raise NotImplementedError

    def reference(self, row: dict) -> Any:
        """A labelled row's reference as eval_step's `references` hold it (a class id), for `finetune evaluate`;
        a predictor without labels (a generator) keeps this default."""
        raise NotImplementedError(f"{type(self).__name__} has no references: its task computes no metrics")

    def references(self, run: RunRecord, limit: int) -> list[tuple[dict, Any]] | None:
        """Up to `limit` (input row, the run's own prediction for it) pairs to check the reloaded artifact
        against. Default None: the core takes the first rows of the run's test split (else eval) and
        predictions.json. A generator returns its samples instead."""
        return None

    def agrees(self, expected: Any, predicted: Any) -> bool:
        """Whether a `prediction` matches the run's own. Default: equal."""
        return expected == predicted

    def metric_options(self) -> dict:
        """What the run's `Task.metric_options` gave its metrics (every class), for `finetune evaluate`."""
        return {}


class BaseTask:
    """The optional members of a task, with their defaults: inherit it, and override what you need."""

    def data_facts(self) -> dict:
        """What the task found in the data worth recording (class names and counts per split, rows dropped
        and why, files skipped), stored in metrics.json under `data.task` for the card (`RunRecord.task_facts`).
        Called once, after training. Default: {}."""
        return {}

    def audit_input(self, row: dict) -> str | Image.Image | None:
        """What the model sees of one example of the prepared data (a row as `prepare_data` returned it), for the
        leakage audit and the data report (`finetune check`, `data.deduplicate`): a text (a text pair joined, a
        sentence's words joined by spaces) or an RGB image. Two examples whose inputs are equal after folding case
        and whitespace are exact duplicates; texts are also compared by MinHash over word shingles, images by
        perceptual hash. Default: None, this task's data is not audited (the report says so)."""
        return None

    def audit_label(self, row: dict) -> Any:
        """What the model is taught for one row (a class id, a tuple of tags), hashable, for the audit's
        conflicting-labels count and the data report's label distribution. None: the task has no labels to
        compare (a generator's captions). Default: None."""
        return None

    def count_items(self, batch: dict) -> torch.Tensor:
        """How many items each example's loss averages over, one count per example: the labelled tokens
        of a sentence for a token-level loss. The core weights every loss by these counts, so that
        accumulated micro-batches and several processes give the loss (and gradient) of one large batch,
        as transformers' `num_items_in_batch` does. Default: 1 per example."""
        import torch

        return torch.ones(batch_examples(batch))

    def metric_options(self) -> dict:
        """Keyword arguments for every metric whose `_compute` accepts them, called after `prepare_data`; a
        classifier returns `{"labels": list(range(num_classes))}` so that averaged metrics use the task's
        whole label set at every evaluation, whichever classes a split happens to hold. Default: {}."""
        return {}

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> list[str]:
        """Turn on gradient checkpointing in the prepared `model` (train.gradient_checkpointing) and return
        the names of the modules switched; the core refuses the key when none was. Default: the
        transformers, diffusers and timm switches of every trainable submodule (finetune.modules)."""
        from finetune.modules import enable_gradient_checkpointing

        return enable_gradient_checkpointing(model)

    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions) -> BasePredictor | None:
        """The finished `run`'s `artifact` loaded for `finetune predict`, `finetune evaluate` and the check
        before a push, the way this task's card snippet loads it (an adapter without merging). Build it from
        the run directory alone, as `card` does. Default: None (the task does not predict)."""
        return None

    def write_samples(self, model: torch.nn.Module, directory: Path) -> None:
        """Generate from the trained `model` what a reader should see of it (a text-to-image model's images
        for the recipe's prompts, with fixed seeds) into `directory` (the run's samples/), for the card.
        Called once, on the main process, after the final evaluation. Default: nothing."""

    def load_saved(self, directory: Path, run: RunRecord, source: str, *, adapter: bool,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
        """What `save` wrote into `directory` for the finished `run`, loaded back (by `finetune export`): a whole model,
        or with `adapter` the method's trained model (a peft model around the base loaded from `source` in `dtype`, as
        `build_model` loads it). Restores the task state that `save` needs (tokenizer, labels) from the run alone.
        Default: refuses, so `finetune export` says that this task cannot."""
        from finetune.errors import FinetuneError

        raise FinetuneError(f"the task plugin '{type(self).__name__}' cannot load its saved model back (it has no "
                            "load_saved member), so `finetune export` cannot work on its runs.")

    def export_inputs(self, model: torch.nn.Module) -> ExportInputs | None:
        """A few inputs for the loaded `model` (from `load_saved`), for an ONNX export. Default: None, no ONNX export."""
        return None

    def build_skeleton(self, source: str, revision: str | None) -> TaskModel | None:
        """The model `build_model` would build, from its configs alone, with every weight on the meta device (no
        weights read or allocated), for `finetune check` (adapters that train nothing, the memory estimate): the
        same modules, head, adapter targets, frozen parts and `components`, plus `example_inputs`. Read only
        configuration files; raise FinetuneError naming model.name when they cannot be read. Called after
        `prepare_data`, so the labels are known. Default: None (those checks are skipped for this task)."""
        return None


class BaseMethod:
    """The optional members of a method, with their defaults: inherit it, and override what you need."""

    title: ClassVar[str] = "a fine-tune"
    """How the card names the result: "This model is **a LoRA adapter** of `base`"."""

    validated_keys: ClassVar[tuple[str, ...]] = ()
    """`method.options` keys that `finetune validate` checks against the model built from its local config
    (`adapter_config` on `Task.build_skeleton`), when the recipe gives one of them: LoRA's target_modules. Checking
    imports torch and the model's library, so validate stays light for recipes without them. Default: none."""

    def missing_requirements(self) -> list[str]:
        """What this machine lacks for the options given (a package, a device), one message each naming the key
        and the fix; `finetune validate` and `run` report them. Not asked when a finished run is read back (a QLoRA
        adapter still predicts on a CPU machine). Default: nothing."""
        return []

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        """The trainable parameters of the prepared `model`, grouped for the optimizer:
        `[{"params": [...]}, {"params": [...], "lr": 1e-5}]`; a group without "lr" uses train.lr.
        The core splits every group again for weight decay. Default: one group of every parameter
        that requires a gradient."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def frozen_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules of the prepared `model` that this method keeps as they are: the core gives them no
        gradient and holds them in eval mode throughout training (dropout off, batch-norm statistics
        fixed), as it does the task's `TaskModel.frozen`. Default: none."""
        return []

    def adapter_config(self, task_model: TaskModel) -> Any:
        """The peft config (`peft.PeftConfig`) that `prepare` applies to `task_model`, for `finetune check` and
        `finetune validate` to match its target modules with peft's own rules. `prepare` must also accept a
        skeleton on the meta device (`Task.build_skeleton`). Default: None (the method adds no adapter)."""
        return None


@runtime_checkable
class Task(Protocol):
    """A task plugin, for type checking; members marked optional default to BaseTask's."""

    Options: ClassVar[type[BaseModel]]
    """Pydantic model of the recipe's `task.options` (use extra="forbid")."""
    methods: ClassVar[tuple[str, ...] | None]
    """Method names this task supports; None for all."""
    default_metrics: ClassVar[list[str]]
    """Metrics used when the recipe's `eval.metrics` is unset."""
    stratify_column: ClassVar[str | None]
    """Column to stratify on when an eval split is carved from train (None: plain random)."""

    def __init__(self, options: BaseModel) -> None: ...

    def prepare_data(self, splits: DatasetDict) -> DatasetDict:
        """Check and normalise raw splits (columns, labels) before any model is loaded.

        Raise finetune.errors.DataError with a message naming the column or file on bad data."""

    def build_model(self, source: str, revision: str | None, *, dtype: torch.dtype | None) -> TaskModel:
        """Load the pretrained backbone from `source` (Hub id or local directory) in `dtype` (model.dtype;
        None: the checkpoint's own), with the ecosystem's low-memory loading, and add the task's head.
        (A plugin whose build_model takes no `dtype` is called without it, and runs in float32 only.)"""

    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        """Turn examples into model inputs (tokenise, transform); cached by `datasets` where possible."""

    def collate(self, examples: list[dict]) -> dict:
        """Make a batch of tensors from preprocessed examples."""

    def training_step(self, model: torch.nn.Module, batch: dict) -> dict:
        """Forward pass; return a dict holding at least `loss`: the mean over the batch's items
        (see `count_items`), as a transformers model's `.loss` is."""

    def eval_step(self, model: torch.nn.Module, batch: dict) -> dict:
        """Forward pass without gradients; return `loss`, a tensor with one value per example (its mean
        over its items, see `count_items`), so that an evaluation under several processes drops the
        examples padded onto the last batch and equals a single process's. To compute metrics, also
        `predictions` and `references`, and `scores` (per-class logits) for metrics that rank classes,
        such as top-5 accuracy. Each is a tensor with one row per example, or a list with one entry per
        example of any length (a sentence's tags), gathered as Python objects; predictions.json stores
        them as given."""

    def save(self, model: torch.nn.Module, directory: Path, *, adapter: bool, state_dict: dict | None = None) -> None:
        """Write the model in its ecosystem's format (an adapter when `adapter` is true) with its tokenizer or image
        processor. Under a sharded engine (FSDP, DeepSpeed ZeRO-3) `state_dict` holds the full weights gathered for
        saving (the model's own are shards), as transformers' `save_pretrained(state_dict=...)` takes them; a
        task whose save does not take `state_dict` is refused under those engines."""

    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        """Card metadata, a usage snippet for `artifact`, and task-specific sections, from the
        finished `run` alone (it may be a copy on another machine: keep no state from training)."""

    # Optional: see BaseTask.
    def data_facts(self) -> dict: ...
    def audit_input(self, row: dict) -> str | Image.Image | None: ...
    def audit_label(self, row: dict) -> Any: ...
    def count_items(self, batch: dict) -> torch.Tensor: ...
    def metric_options(self) -> dict: ...
    def write_samples(self, model: torch.nn.Module, directory: Path) -> None: ...
    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions) -> BasePredictor | None: ...
    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> list[str]: ...
    def load_saved(self, directory: Path, run: RunRecord, source: str, *, adapter: bool,
                   dtype: torch.dtype | None = None) -> torch.nn.Module: ...
    def export_inputs(self, model: torch.nn.Module) -> ExportInputs | None: ...
    def build_skeleton(self, source: str, revision: str | None) -> TaskModel | None: ...


@runtime_checkable
class Method(Protocol):
    """A method plugin, for type checking; members marked optional default to BaseMethod's."""

    Options: ClassVar[type[BaseModel]]
    """Pydantic model of the recipe's `method.options`."""
    produces_adapter: ClassVar[bool]
    """True when the saved artifact is an adapter on top of the base model (then `merge` is called for merged exports)."""

    def __init__(self, options: BaseModel) -> None: ...

    def prepare(self, task_model: TaskModel) -> torch.nn.Module:
        """Make the model trainable this method's way; return the module to train."""

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """Fold an adapter into its base model (adapter methods only)."""

    # Optional: see BaseMethod.
    title: ClassVar[str]
    validated_keys: ClassVar[tuple[str, ...]]
    def parameter_groups(self, model: torch.nn.Module) -> list[dict]: ...
    def frozen_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]: ...
    def adapter_config(self, task_model: TaskModel) -> Any: ...
    def missing_requirements(self) -> list[str]: ...


def batch_examples(batch: dict) -> int:
    """The number of examples in a collated batch: the length of any of its tensors."""
    return len(next(iter(batch.values())))


SMALL_SPLIT = 100
"""A split with fewer examples than this gets a note in the card's Limitations: its metrics are uncertain."""

PUBLIC_MODULES = (
    "finetune.api",  # this contract
    "finetune.errors",  # DataError, FinetuneError: shown to the user as one clean message
    "finetune.testing",  # tiny models and data, run_recipe, check_conformance
    "finetune.metrics",  # Metrics: load and compute metrics by name, as a run does
    "finetune.columns",  # require_columns: a missing column named, with the data.columns fix
    "finetune.labels",  # encode_labels: a label column to a checked ClassLabel
    "finetune.images",  # open_image, check_images
    "finetune.reports",  # classification_sections: per-class table and confusion matrix for a card
    "finetune.modules",  # is_within: whether a parameter or module lies inside given modules
    "finetune.transformers_models",  # TransformersClassifier: the base of text and token classification
)
"""The modules a plugin may import. The rest of finetune is internal and may change."""

_CONTRACTS = {"task": Task, "method": Method}
_BASES = {"task": BaseTask, "method": BaseMethod}
OPTIONAL = {kind: tuple(n for n in vars(base) if not n.startswith("_")) for kind, base in _BASES.items()}
"""Members a plugin may leave out: the ones BaseTask / BaseMethod define."""


def with_defaults(plugin: type, kind: str) -> type:
    """`plugin`, inheriting the optional members' defaults if it does not already: the core then calls
    every member directly. The subclass keeps the plugin's name and module (its errors name the plugin)."""
    base = _BASES[kind]
    if issubclass(plugin, base):
        return plugin
    return type(plugin.__name__, (plugin, base), {"__module__": plugin.__module__, "__qualname__": plugin.__qualname__,
                                                 "__doc__": plugin.__doc__})


def check_plugin(plugin: Any, kind: str) -> list[str]:
    """Every way `plugin` falls short of the contract for `kind`, all at once (empty when it conforms)."""
    contract = _CONTRACTS[kind]
    if not inspect.isclass(plugin):
        return [f"the entry point must name a class, not {type(plugin).__name__} {plugin!r}"]
    problems = []
    for member in _members(contract):
        if not hasattr(plugin, member):
            if member not in OPTIONAL[kind]:
                problems.append(f"missing member '{member}'")
        elif inspect.isfunction(vars(contract).get(member)) and not callable(getattr(plugin, member)):
            problems.append(f"'{member}' must be a method")
    options = getattr(plugin, "Options", None)
    if options is not None and not (inspect.isclass(options) and issubclass(options, BaseModel)):
        problems.append("'Options' must be a pydantic BaseModel subclass")
    return problems


def _members(contract) -> list[str]:
    names = [n for n in contract.__annotations__ if not n.startswith("_")]
    names += [n for n, v in vars(contract).items() if inspect.isfunction(v) and not n.startswith("_")]
    return names
