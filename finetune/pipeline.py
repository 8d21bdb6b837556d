"""One run, start to finish: check → data → model → method → train → evaluate → save → card.

Every check that can fail on the user's input (recipe, plugins, data, columns, labels) runs
before the run directory is touched. Every collective (training, the final evaluations, the rank
checksums) is done before the main process writes the outputs, so no process waits in a barrier
while it saves, samples and renders the card.
"""

from __future__ import annotations

import errno
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import plugins
from finetune.files import atomic_path, write_json
from finetune.recipe import Recipe
from finetune.rundir import RunLayout


@dataclass
class RunSummary:
    run_dir: Path
    model_dir: Path
    card: Path
    metrics: dict
    parameters: dict


@dataclass
class _Run:
    """What a run is made of once its inputs are checked and its model is built."""

    recipe: Recipe
    layout: RunLayout
    accelerator: Any
    task: Any
    method: Any
    splits: Any
    """The raw splits (train / eval / test), as the task prepared them."""
    eval_carved: bool
    leakage: dict | None
    """The leakage audit's facts (data.deduplicate), for metrics.json; None when it did not run."""
    source: str
    task_model: Any
    model: Any
    """The method's trainable model."""
    frozen: list
    parameters: dict
    metrics: Any


def run(recipe: Recipe, *, resume: bool | str = False, overwrite: bool = False) -> RunSummary:
    """`resume`: True, False, or "auto" (resume when a complete checkpoint exists)."""
    from finetune.storage import CannotWrite, disk_problem

    try:
        return _run(recipe, resume=resume, overwrite=overwrite)
    except OSError as exc:  # a write outside the checkpoints and the final outputs (those say more)
        reason = disk_problem(exc)
        if reason is None or exc.errno == errno.EACCES:  # that one may as well be a read (of the model, the data)
            raise
        where = Path(exc.filename) if exc.filename else None
        in_run = where is None or Path(recipe.run_dir).resolve() in where.resolve().parents
        fix = ("set output.dir to another disk, one this user may write to" if in_run else
               "move the caches to another disk: HF_HOME, HF_DATASETS_CACHE")
        raise CannotWrite(f"Could not write {where or 'to ' + str(recipe.run_dir)}: {reason}. Free some space (or {fix}) "
                          "and continue with --resume auto.") from None
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError is one)
        if not _lost_peers(exc):
            raise
        import torch.distributed

        if not torch.distributed.is_initialized():
            raise
        from finetune.errors import FinetuneError

        raise FinetuneError(
            f"A process waited for the others at a collective longer than train.distributed_timeout_minutes "
            f"({recipe.train.distributed_timeout_minutes:g}), or lost them ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Raise train.distributed_timeout_minutes when one process legitimately works alone for that long (preparing "
            "a large dataset); otherwise look for a process that died first (its own error is above)."
        ) from None


def _lost_peers(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe"))


def _run(recipe: Recipe, *, resume: bool | str, overwrite: bool) -> RunSummary:
    from finetune.storage import expected_bytes, space_warning, writing
    from finetune.tracking import tracked
    from finetune.training.engine import check_shared_run_dir, is_sharded
    from finetune.training.loop import train

    layout = RunLayout(recipe.run_dir)
    resume, overwrite = layout.resolve_resume(recipe.to_yaml(), resume, overwrite)
    layout.check_startable(recipe.to_yaml(), resume=resume, overwrite=overwrite)
    r = _build(recipe, layout)
    adapter = r.method.produces_adapter
    expected = expected_bytes(r.model, adapter=adapter, merged=recipe.writes_merged and adapter)
    warning = space_warning(layout.root, expected) if r.accelerator.is_main_process else None
    if warning:
        print(warning, file=sys.stderr)
    with r.accelerator.local_main_process_first():  # per node: its main process tokenises, the others read its cache
        processed = r.task.preprocess(r.splits, r.task_model)

    if r.accelerator.is_main_process:
        layout.begin(recipe.to_yaml(), resume=resume, overwrite=overwrite)
    r.accelerator.wait_for_everyone()
    check_shared_run_dir(r.accelerator, layout.root)

    with tracked(r.accelerator, recipe, layout, resume) as tracking:
        trained = train(r.accelerator, r.model, r.task, r.method, r.frozen, processed, recipe, r.metrics,
                        layout.checkpoints, layout.steplog, resume, tracking)
        final = _final_evaluations(r, trained, processed)
        summary = _summary(r, trained, final)
        # The last collective: under FSDP / ZeRO-3 the full weights are gathered onto the main process for saving.
        gathered = r.accelerator.get_state_dict(trained.model) if is_sharded(r.accelerator) else None
        if r.accelerator.is_main_process:
            with writing("the final model, metrics and card", layout.root, needed=expected["final_model"],
                         checkpoints=layout.checkpoints):
                _write_outputs(r, r.accelerator.unwrap_model(trained.model), final, summary, gathered)
            if tracking is not None:
                tracking.log_outputs(summary["metrics"], trained.state.step)
    if r.accelerator.is_main_process:
        # The other processes keep their process group: tearing it down while this one still writes the outputs
        # can abort in gloo's teardown, and the launcher would then kill this process mid-save.
        r.accelerator.end_training()
    return RunSummary(layout.root, layout.model, layout.card, summary["metrics"], r.parameters)


def _build(recipe: Recipe, layout: RunLayout) -> _Run:
    """Plugins, engine, data, then the model made trainable by the method; data first, so that bad
    columns, labels or images fail before any model is loaded."""
    from accelerate.utils import set_seed

    from finetune.data import finish_splits, load_splits
    from finetune.leakage import deduplicate
    from finetune.metrics import Metrics
    from finetune.sources import resolve_model_source
    from finetune.training.engine import check_engine, count_parameters, make_accelerator

    task = plugins.load(plugins.TASKS, recipe.task.name)(recipe.task_options)
    method = plugins.load(plugins.METHODS, recipe.method.name)(recipe.method_options)
    accelerator = make_accelerator(recipe)
    check_engine(accelerator, recipe, task, method)
    # Each node's main process does the expensive checks (decoding every image) and caches them in the node's
    # datasets cache; the node's other processes read that cache.
    with accelerator.local_main_process_first():
        splits = task.prepare_data(load_splits(recipe))
    eval_carved = "eval" not in splits
    splits = finish_splits(splits, recipe, task.stratify_column)
    # The same seeded audit on every process, so every rank drops the same eval / test rows.
    splits, leakage = deduplicate(splits, task, recipe, main_process=accelerator.is_main_process)
    metrics = Metrics(recipe.eval.metrics or task.default_metrics, task.metric_options())
    source = resolve_model_source(recipe.model.name, recipe.base_dir)

    # The head's initialisation, dropout, noise, augmentation. Each process gets its own stream (the
    # seed plus its index: a single process is seeded as the recipe says); identical draws on every rank
    # would waste the extra processes, and DDP starts every rank from rank 0's weights anyway.
    set_seed(recipe.train.seed, device_specific=True)
    task_model, model, frozen = _make_model(recipe, task, method, source)
    parameters = count_parameters(model)
    accelerator.print(
        f"{recipe.method.name}: training {parameters['trainable']:,} of {parameters['total']:,} parameters "
        f"({100 * parameters['trainable'] / parameters['total']:.2f}%)"
    )
    return _Run(recipe, layout, accelerator, task, method, splits, eval_carved, leakage, source, task_model, model, frozen, parameters,
                metrics)


def _make_model(recipe: Recipe, task, method, source: str):
    """The task's model, loaded in model.dtype, made trainable by the method, its frozen modules frozen, each
    weight in its precision (finetune.training.precision), gradient checkpointing on when asked."""
    from finetune.training.precision import settle_dtypes

    task_model = task.build_model(source, recipe.model.revision, **_dtype_argument(task, recipe.model.dtype))
    model = method.prepare(task_model)
    frozen = _freeze(task_model, method, model)
    components = [task_model.model.get_submodule(name) for name in task_model.frozen]
    settle_dtypes(model, components, recipe.train.mixed_precision)
    if recipe.train.gradient_checkpointing:
        _checkpoint_gradients(recipe, task, model, frozen)
    return task_model, model, frozen


def _checkpoint_gradients(recipe: Recipe, task, model, frozen: list) -> None:
    import torch

    from finetune.errors import FinetuneError
    from finetune.modules import is_within

    names = {module: name for name, module in model.named_modules()}
    frozen_names = [names[m] for m in frozen if m in names]
    training_norms = [name for name, m in model.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not is_within(name, frozen_names)]
    if training_norms:
        raise FinetuneError(
            f"train.gradient_checkpointing: this model's batch-norm layers train ({training_norms[0]} …): the recomputed "
            "forward pass would update their running statistics a second time at every step (a PyTorch limitation), "
            "and the model would silently differ from the one trained without. Remove the key, use a model with layer "
            "norm (ConvNeXt, ViT), or LoRA / feature extraction, which keep batch norm frozen."
        )
    if not task.enable_gradient_checkpointing(model):
        raise FinetuneError(
            f"train.gradient_checkpointing: no trainable module of this {recipe.task.name} model has a gradient "
            "checkpointing switch (transformers, diffusers and timm models have one). Remove the key, or give the task "
            "plugin an enable_gradient_checkpointing member."
        )


def _dtype_argument(task, dtype: str) -> dict:
    """build_model's `dtype` argument; a plugin written before model.dtype existed loads in float32 only."""
    import inspect

    from finetune.errors import FinetuneError
    from finetune.training.precision import load_dtype

    if "dtype" in inspect.signature(task.build_model).parameters:
        return {"dtype": load_dtype(dtype)}
    if dtype != "float32":
        raise FinetuneError(f"model.dtype: the task plugin '{type(task).__name__}' loads its model in float32 only; "
                            "remove model.dtype (or set it to float32).")
    return {}


def _freeze(task_model, method, model) -> list:
    """The task's frozen modules (TaskModel.frozen) and the method's (Method.frozen_modules) do not train,
    whatever the method did: no gradient (and so no place in the optimizer), and eval mode during
    training (dropout off, statistics fixed), which the training loop keeps. Returns those modules."""
    frozen = [task_model.model.get_submodule(name) for name in task_model.frozen] + list(method.frozen_modules(model))
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def _final_evaluations(r: _Run, trained, processed) -> dict:
    """The kept weights on eval (already evaluated by the loop) and test. A model whose final evaluation
    is not finite is not presented as trained (the loop has already stopped on a non-finite training or
    eval loss; this catches a test split that overflows)."""
    from finetune.errors import TrainingDiverged
    from finetune.training.eval_loop import eval_loader, evaluate

    final = {"eval": trained.evaluation}
    if "test" in processed:
        test_dl = r.accelerator.prepare(eval_loader(processed["test"], r.recipe, r.task))
        final["test"] = evaluate(r.accelerator, trained.model, r.task, test_dl, r.metrics)
    for split, evaluation in final.items():
        if not math.isfinite(evaluation.metrics["loss"]):
            raise TrainingDiverged(
                f"The final model's {split} loss is {evaluation.metrics['loss']}: no model or card was written. "
                "Look for inputs that overflow (fp16: use bf16), or lower train.lr; the checkpoints are kept."
            )
    return final


def _summary(r: _Run, trained, final: dict) -> dict:
    """metrics.json, but for the facts only the main process collects (_write_outputs adds them)."""
    from finetune.training.engine import is_sharded, peak_memory, rank_checksums

    state = trained.state
    summary = {
        "metrics": {split: result.metrics for split, result in final.items()},
        "parameters": r.parameters,
        "split_sizes": {role: len(r.splits[role]) for role in ("train", "eval", "test") if role in r.splits},
        "steps": state.steps_taken,  # optimizer steps that changed the weights
        "skipped_steps": state.skipped_steps,  # updates the fp16 gradient scaler skipped
        "model_step": trained.model_step,  # the step whose weights model/ holds
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 1),  # training steps only, every session of the run
        "peak_memory_mb": peak_memory(r.accelerator),  # this session's, on the main process
        "lr_changes": state.lr_changes,
        "history": state.history,
        "metric_options": _as_json(r.task.metric_options()),  # what the metrics were given, for `finetune compare`
    }
    if r.accelerator.num_processes > 1 and not is_sharded(r.accelerator):  # shards differ by design
        summary["rank_checksums"] = rank_checksums(r.accelerator, r.accelerator.unwrap_model(trained.model))
    return summary


def _as_json(value):
    """`value` when JSON can hold it, else None (a plugin's metric options of another kind are not recorded)."""
    import json

    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _write_outputs(r: _Run, model, final: dict, summary: dict, gathered: dict | None) -> None:
    """On the main process alone: the provenance facts, the model (and its merged copy), the samples,
    the predictions, metrics.json and the card. Each output is moved into place once complete."""
    from finetune.card import write_card
    from finetune.export import save_merged
    from finetune.provenance import describe_base_model, describe_data, describe_environment

    recipe, layout, task, method = r.recipe, r.layout, r.task, r.method
    summary["base_model"] = describe_base_model(recipe, r.source, r.task_model.hub_id)
    summary["data"] = describe_data(recipe, r.splits, eval_carved=r.eval_carved, task_facts=task.data_facts())
    if r.leakage is not None:
        summary["data"]["leakage"] = r.leakage
    summary["environment"] = describe_environment(r.accelerator)
    with atomic_path(layout.model) as tmp:
        task.save(model, tmp, adapter=method.produces_adapter, **({} if gathered is None else {"state_dict": gathered}))
    _write_samples(task, model, layout)  # after the save (a failure here loses no model), before any merge
    if recipe.writes_merged and method.produces_adapter:
        save_merged(task, method, model, layout.merged)  # the last use of `model`: merging changes it in place
    write_json(layout.predictions, {s: {"predictions": e.predictions, "references": e.references} for s, e in final.items()})
    write_json(layout.example_losses, {s: e.losses for s, e in final.items()})  # for intervals on the loss (compare)
    write_json(layout.metrics, summary)
    write_card(layout.root)


def _write_samples(task, model, layout: RunLayout) -> None:
    """samples/, only when the task wrote anything into it."""
    with atomic_path(layout.samples) as tmp:
        tmp.mkdir()
        task.write_samples(model, tmp)
    if not any(layout.samples.iterdir()):
        layout.samples.rmdir()
