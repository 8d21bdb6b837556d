"""One run, start to finish: check → data → model → method → train → evaluate → save → card.

Every check that can fail on the user's input (recipe, plugins, data, columns, labels) runs
before the run directory is touched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune import plugins
from finetune.api import data_facts_of, metric_options_of, write_samples_of
from finetune.recipe import Recipe
from finetune.rundir import RunLayout, replace_dir, write_json


@dataclass
class RunSummary:
    run_dir: Path
    model_dir: Path
    card: Path
    metrics: dict
    parameters: dict


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> RunSummary:
    from finetune.card import write_card
    from finetune.data import finish_splits, load_splits
    from finetune.evaluation import Metrics
    from finetune.provenance import base_model_facts, data_facts, environment_facts
    from finetune.sources import resolve_model_source

    layout = RunLayout(recipe.run_dir)
    layout.check_startable(recipe.to_yaml(), resume=resume, overwrite=overwrite)
    task = plugins.load(plugins.TASKS, recipe.task.name)(recipe.task_options)
    method = plugins.load(plugins.METHODS, recipe.method.name)(recipe.method_options)

    accelerator = _accelerator(recipe)
    # Data first: bad columns, labels or images fail before any model is loaded. The main process
    # does the expensive checks (decoding every image) and caches them; the others read its cache.
    with accelerator.main_process_first():
        splits = task.prepare_data(load_splits(recipe))
    eval_carved = "eval" not in splits
    splits = finish_splits(splits, recipe, task.stratify_column)
    metrics = Metrics(recipe.eval.metrics or task.default_metrics, metric_options_of(task))
    source = resolve_model_source(recipe.model.name, recipe.base_dir)

    from accelerate.utils import set_seed

    # The head's initialisation, dropout, noise, augmentation. Each process gets its own stream (the
    # seed plus its index: a single process is seeded as the recipe says); identical draws on every rank
    # would waste the extra processes, and DDP starts every rank from rank 0's weights anyway.
    set_seed(recipe.train.seed, device_specific=True)
    task_model = task.build_model(source, recipe.model.revision)
    model = method.prepare(task_model)
    _freeze(task_model)
    parameters = _count_parameters(model)
    accelerator.print(
        f"{recipe.method.name}: training {parameters['trainable']:,} of {parameters['total']:,} parameters "
        f"({100 * parameters['trainable'] / parameters['total']:.2f}%)"
    )
    with accelerator.main_process_first():  # the main process tokenises, the others read its cache
        processed = task.preprocess(splits, task_model)

    if accelerator.is_main_process:
        layout.begin(recipe.to_yaml(), resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()

    from finetune.training.eval_loop import eval_loader, evaluate
    from finetune.training.loop import train

    trained = train(accelerator, model, task, method, processed, recipe, metrics, layout.checkpoints, layout.steplog, resume)
    model, state = trained.model, trained.state
    final = {"eval": trained.evaluation}
    if "test" in processed:
        test_dl = accelerator.prepare(eval_loader(processed["test"], recipe, task))
        final["test"] = evaluate(accelerator, model, task, test_dl, metrics)
    _refuse_non_finite(final)

    summary = {
        "metrics": {split: result.metrics for split, result in final.items()},
        "parameters": parameters,
        "split_sizes": {role: len(splits[role]) for role in ("train", "eval", "test") if role in splits},
        "steps": state.steps_taken,  # optimizer steps that changed the weights
        "skipped_steps": state.skipped_steps,  # updates the fp16 gradient scaler skipped
        "model_step": trained.model_step,  # the step whose weights model/ holds
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 1),  # training steps only, every session of the run
        "lr_changes": state.lr_changes,
        "history": state.history,
    }
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        summary["rank_checksums"] = _rank_checksums(accelerator, unwrapped)

    if accelerator.is_main_process:  # hashing the data folder once is enough
        summary["base_model"] = base_model_facts(recipe, source, task_model.hub_id)
        summary["data"] = data_facts(recipe, splits, task.stratify_column, eval_carved=eval_carved, task_facts=data_facts_of(task))
        summary["environment"] = environment_facts(accelerator)
        _save_model(task, method, unwrapped, layout)
        _write_samples(task, unwrapped, layout)  # after the save (a failure here loses no model), before any merge
        if recipe.writes_merged and method.produces_adapter:
            _save_merged(task, method, unwrapped, layout)
        write_json(layout.predictions, {s: {"predictions": r.predictions, "references": r.references} for s, r in final.items()})
        write_json(layout.metrics, summary)
        write_card(layout.root)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunSummary(layout.root, layout.model, layout.card, summary["metrics"], parameters)


def _accelerator(recipe: Recipe):
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType
    from accelerate.state import AcceleratorState

    from finetune.errors import FinetuneError

    # accelerate keeps one process-wide state that would pin the first run's precision when a
    # process runs several recipes (a notebook, the tests); the distributed part is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1"
    if recipe.train.mixed_precision == "fp16" and cpu:
        # accelerate would accept it and quietly train in fp32 (no autocast, no gradient scaler).
        raise FinetuneError(
            "train.mixed_precision: 'fp16' needs a CUDA GPU, and none is in use here; "
            "set train.mixed_precision to bf16 (autocast on the CPU too) or no."
        )
    try:
        # Accumulation is done by the training loop (exact on a short last window), not by accelerate.
        accelerator = Accelerator(
            mixed_precision=recipe.train.mixed_precision,
            cpu=cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        )
    except (ValueError, RuntimeError) as exc:
        raise FinetuneError(
            f"accelerate could not start ({type(exc).__name__}: {exc}); the recipe asks for train.mixed_precision "
            f"'{recipe.train.mixed_precision}' on the {'CPU' if cpu else 'GPU'}. Fix what accelerate names, or set "
            "train.mixed_precision: no."
        ) from None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its engine steps inside backward at every micro-batch unless told the window; not wired up yet.
        raise FinetuneError(
            "DeepSpeed is not supported by finetune's training loop yet; launch with DDP (finetune run --processes N, "
            "torchrun, or an accelerate config without deepspeed_config)."
        )
    return accelerator


def _refuse_non_finite(final: dict) -> None:
    """A model whose final evaluation is not finite is not presented as trained (the loop has already
    stopped on a non-finite training or eval loss; this catches a test split that overflows)."""
    import math

    from finetune.errors import TrainingDiverged

    for split, evaluation in final.items():
        if not math.isfinite(evaluation.metrics["loss"]):
            raise TrainingDiverged(
                f"The final model's {split} loss is {evaluation.metrics['loss']}: no model or card was written. "
                "Look for inputs that overflow (fp16: use bf16), or lower train.lr; the checkpoints are kept."
            )


def _freeze(task_model) -> None:
    """Whatever the method did, the task's frozen modules (TaskModel.frozen) do not train: no gradient,
    eval mode (dropout off, statistics fixed), and so no place in the optimizer built next."""
    from finetune.methods.common import keep_in_eval

    for name in task_model.frozen:
        module = task_model.model.get_submodule(name)
        module.requires_grad_(False)
        keep_in_eval(module)


def _write_samples(task, model, layout: RunLayout) -> None:
    """Into a temporary folder, moved into place once complete, and only when the task wrote anything."""
    tmp = layout.root / ".samples.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a crashed run left
    tmp.mkdir()
    write_samples_of(task, model, tmp)
    if any(tmp.iterdir()):
        replace_dir(tmp, layout.samples)
    else:
        tmp.rmdir()


def _save_model(task, method, model, layout: RunLayout) -> None:
    """Write the model into a temporary folder and move it into place once complete."""
    tmp = layout.root / ".model.tmp"
    task.save(model, tmp, adapter=method.produces_adapter)
    replace_dir(tmp, layout.model)


def _save_merged(task, method, model, layout: RunLayout) -> None:
    """The adapter folded into its base, written as a whole model. Merging changes `model` in place
    (peft's merge_and_unload): nothing may use the adapter model after this."""
    tmp = layout.root / ".model-merged.tmp"
    task.save(method.merge(model), tmp, adapter=False)
    replace_dir(tmp, layout.merged)


def _count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def _rank_checksums(accelerator, model) -> list[float]:
    """A checksum of every parameter on each rank: equal when gradients were really synchronised."""
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    return accelerator.gather(checksum.to(accelerator.device)).tolist()
