"""Two checks of `finetune check` on the recipe's model built without weights (`Task.build_skeleton`: configs only,
every tensor on the meta device, finetune/adapters.py): adapters that would train nothing (`adapter_check`; the
same matching runs at `finetune validate` when the recipe names its targets: `adapters.validate_adapters`), and
the memory a run needs per method (`memory_check`).

The memory estimate, per process, in bytes (the README shows it):

    weights      = Σ parameters and buffers × their size: trained ones in float32, frozen ones in model.dtype
    gradients    = trained parameters × 4 (float32)
    optimizer    = trained parameters × 8 (AdamW: exp_avg and exp_avg_sq, float32 each)
    activations  = Σ bytes of the tensors autograd saves for the backward pass in one training forward of a
                   batch of train.batch_size examples at the longest input (text: max_length tokens, no padding
                   mask; images: the model's input size), counted on the meta device (each storage once,
                   weights excluded): exactly what the architecture and the method keep, not a rule of thumb
    total        = weights + optimizer + max(gradients, activations)       with train.grad_accum_steps 1
                 = weights + optimizer + gradients + activations            with accumulation
                   (the backward pass frees each layer's saved tensors as it writes that layer's gradients, and
                   zero_grad frees the gradients after the step; accumulated gradients stay through the next
                   micro-batch's forward, beside its activations)

The weights figure is accelerate's `calculate_maximum_sizes` (what `accelerate estimate-memory` reports) of the
same skeleton when everything is float32; the section shows both, and accelerate's own training figure
(`estimate_training_usage`: weights, gradients, AdamW, no activations) beside the full fine-tune's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.adapters import SkeletonUnavailable, adapted_modules, adapter_problems, build_skeleton
from finetune.checks import Finding, Section
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.api import TaskModel
    from finetune.checks import CheckContext

_MB = 2**20
_DTYPE_BYTES = {"float32": 4, "auto": 4, "bfloat16": 2, "float16": 2}
_METHODS = ("feature-extraction", "full", "lora")


# -- adapters that train nothing ---------------------------------------------------------------------
def adapter_check(context: CheckContext) -> Section:
    """Adapters: every component the recipe trains gets an adapter."""
    section = Section("Adapters", columns=["component", "trained", "modules adapted", "adapted names"])
    if type(context.method).adapter_config is _base_adapter_config():
        section.skipped = f"the method '{context.recipe.method.name}' adds no adapter"
        return section
    try:
        skeleton = build_skeleton(context.task, context.source, context.recipe.model.revision)
    except SkeletonUnavailable as exc:
        section.skipped = str(exc)
        return section
    config = context.method.adapter_config(skeleton)
    for component, trained, adapted in adapted_modules(skeleton, config):
        names = sorted({name.rpartition(".")[2] for name in adapted})
        section.rows.append([component or "(the model)", "yes" if trained else "frozen", len(adapted), ", ".join(names)])
        section.facts[component or "model"] = {"trained": trained, "adapted": len(adapted)}
    section.findings = [Finding("error", message, key=key) for key, message in adapter_problems(skeleton, config)]
    return section


def _base_adapter_config():
    from finetune.api import BaseMethod

    return BaseMethod.adapter_config


# -- memory ------------------------------------------------------------------------------------------
def memory_check(context: CheckContext) -> Section:
    """Memory per method: weights, gradients, AdamW states and activations, against the device's memory."""
    section = Section("Memory per process (MB)", columns=[
        "method", "trained parameters", "weights", "gradients", "optimizer", "activations", "total", "fits"])
    recipe = context.recipe
    train_size = len(context.splits["train"])  # also sets the task's labels, so the head has its real size
    estimates = {}
    for name in _methods_to_show(context):
        try:
            estimates[name] = estimate(context, name)
        except SkeletonUnavailable as exc:
            section.skipped = str(exc)
            return section
        except FinetuneError as exc:  # the recipe's method cannot prepare this model: the Adapters section says why
            section.findings.append(Finding("note", f"method '{name}' not estimated: {exc}"))
    if context.recipe.method.name not in estimates:
        return section
    available, where = available_memory(recipe)
    for name, numbers in estimates.items():
        fits = numbers["total"] <= available
        mark = " (recipe)" if name == recipe.method.name else ""
        section.rows.append([name + mark, numbers["trained_parameters"], *(round(numbers[k] / _MB, 1) for k in (
            "weights", "gradients", "optimizer", "activations", "total")), "yes" if fits else "NO"])
    own = estimates[recipe.method.name]
    section.facts = {"methods": estimates, "available": available, "device": where,
                     "steps": steps(recipe, train_size), "accelerate": accelerate_figures(context)}
    section.findings += _memory_findings(recipe, own, available, where, section.facts)
    return section


def _methods_to_show(context: CheckContext) -> list[str]:
    supported = getattr(context.task, "methods", None)
    names = [m for m in _METHODS if supported is None or m in supported]
    return list(dict.fromkeys([context.recipe.method.name, *names]))


def estimate(context: CheckContext, method_name: str) -> dict:
    """The formula of this module's docstring for the recipe's model under `method_name` (the recipe's own method
    with its options; another with its defaults)."""
    from finetune import plugins

    recipe = context.recipe
    skeleton = build_skeleton(context.task, context.source, recipe.model.revision)
    if method_name == recipe.method.name:
        method = context.method
    else:
        method_cls = plugins.load(plugins.METHODS, method_name)
        method = method_cls(method_cls.Options())
    return estimate_prepared(skeleton, method, recipe.train.batch_size, _DTYPE_BYTES[recipe.model.dtype],
                             accumulating=recipe.train.grad_accum_steps > 1)


def estimate_prepared(skeleton: TaskModel, method, batch_size: int, frozen_bytes: int = 4, *,
                      accumulating: bool = False) -> dict:
    """Bytes of weights, gradients, optimizer states and activations once `method` prepared `skeleton` and the
    core froze what it freezes (as pipeline._freeze does), for a batch of `batch_size`."""
    model = method.prepare(skeleton)
    model.train()
    for module in [skeleton.model.get_submodule(n) for n in skeleton.frozen] + list(method.frozen_modules(model)):
        module.requires_grad_(False)  # as a run: no gradient and eval mode for the frozen modules
        module.eval()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * (4 if p.requires_grad else min(frozen_bytes, p.element_size())) for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    activations = saved_activation_bytes(model, skeleton.example_inputs(batch_size)) if skeleton.example_inputs else 0
    numbers = {"trained_parameters": trained, "weights": weights, "gradients": 4 * trained, "optimizer": 8 * trained,
               "activations": activations}
    both = numbers["gradients"] + activations if accumulating else max(numbers["gradients"], activations)
    numbers["total"] = weights + numbers["optimizer"] + both
    return numbers


def saved_activation_bytes(model, inputs: dict) -> int:
    """Bytes of the tensors autograd saves for backward during one forward of `model` on `inputs` (meta tensors),
    each storage once, parameters excluded. 0 when the forward cannot run on the meta device."""
    import torch

    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**inputs)
    except Exception:  # an op without a meta kernel, a value read (.item()): no activation figure
        return 0
    return sum(saved.values())


def available_memory(recipe) -> tuple[int, str]:
    """(bytes free, where): the free memory of the GPU a run would use (`torch.cuda.mem_get_info`), else the
    system's available RAM (MemAvailable)."""
    import torch

    if torch.cuda.is_available() and not os.environ.get("FINETUNE_CPU"):
        free, _ = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.get_device_name()} (free)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "system RAM (available)"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system RAM (available)"


def steps(recipe, train_size: int, processes: int | None = None) -> dict:
    """Optimizer steps per epoch and in all, as the training loop counts them: ceil(ceil(N / (batch × processes)) /
    accumulation); processes from the launcher's WORLD_SIZE, else 1."""
    t = recipe.train
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(math.ceil(train_size / (t.batch_size * processes)) / t.grad_accum_steps)
    return {"train_examples": train_size, "processes": processes, "per_epoch": per_epoch,
            "total": t.max_steps or t.epochs * per_epoch}


def accelerate_figures(context: CheckContext) -> dict:
    """accelerate's `estimate-memory` numbers for the recipe's model skeleton: `calculate_maximum_sizes` (the
    weights, float32) and `estimate_training_usage` (its training figure, float32, without activations)."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    skeleton = build_skeleton(context.task, context.source, context.recipe.model.revision)
    total, _ = calculate_maximum_sizes(skeleton.model)
    usage = estimate_training_usage(total, "float32")
    return {"weights": total, "training": usage["model"] + usage["gradients"] + usage["optimizer"]}


def _memory_findings(recipe, own: dict, available: int, where: str, facts: dict) -> list[Finding]:
    s, acc = facts["steps"], facts["accelerate"]
    findings = [Finding("note", (
        f"accelerate estimate-memory, same model: weights {acc['weights'] / _MB:.1f} MB, training (weights, gradients, "
        f"AdamW, no activations) {acc['training'] / _MB:.1f} MB. Steps: {s['per_epoch']} per epoch "
        f"({s['train_examples']} examples, batch {recipe.train.batch_size} × {recipe.train.grad_accum_steps} "
        f"accumulation × {s['processes']} processes), {s['total']} in all."))]
    if not own["activations"]:
        findings.append(Finding("note", "activations are not estimated: the model's forward does not run without "
                                        "weights (on the meta device), so the total leaves them out."))
    if recipe.train.mixed_precision != "no" or recipe.train.gradient_checkpointing:
        findings.append(Finding("note", "activations are counted in float32 without gradient checkpointing; "
                                        "train.mixed_precision and train.gradient_checkpointing make them smaller."))
    if own["total"] > available:
        findings.append(Finding("error", (
            f"method '{recipe.method.name}' needs about {own['total'] / _MB:.0f} MB per process, more than the "
            f"{available / _MB:.0f} MB of {where}. Lower train.batch_size (with train.grad_accum_steps to keep the "
            "batch), turn on train.gradient_checkpointing, or use an adapter method (lora)."), key="train.batch_size"))
    elif own["total"] > 0.9 * available:
        findings.append(Finding("warning", (
            f"method '{recipe.method.name}' needs about {own['total'] / _MB:.0f} MB per process, over 90% of the "
            f"{available / _MB:.0f} MB of {where}; the run may run out of memory."), key="train.batch_size"))
    return findings
