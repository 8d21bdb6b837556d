"""Model skeletons and adapter matching, shared by `finetune check` (finetune/estimate.py) and `finetune validate`
(recipe.cross_checks): the recipe's model built without weights (`Task.build_skeleton`: configs only, every tensor on
the meta device), and which of its modules the method's peft config adapts, by peft's own matching rules
(`check_target_module_exists`: suffixes, exclusions, layer indexes), per component the recipe trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.api import TaskModel


class SkeletonUnavailable(Exception):
    """Why the checks that need the model skeleton cannot run (the reason a skipped section shows)."""


# -- skeletons ---------------------------------------------------------------------------------------
def build_skeleton(task, source: str, revision: str | None) -> TaskModel:
    """`task.build_skeleton`, or SkeletonUnavailable saying why not: the task has none, or its configs are on the
    Hub and cannot be read here."""
    from finetune.api import BaseTask

    if getattr(type(task), "build_skeleton", BaseTask.build_skeleton) is BaseTask.build_skeleton:
        raise SkeletonUnavailable(f"the task plugin '{type(task).__name__}' cannot build its model without weights "
                                  "(it has no build_skeleton member)")
    try:
        skeleton = task.build_skeleton(source, revision)
    except FinetuneError as exc:
        if Path(source).is_dir():
            raise
        raise SkeletonUnavailable(
            f"it needs the Hub: model.name '{source}' is not a local folder, and its config could not be read here "
            f"({str(exc).splitlines()[0][:300]}). Run the check where the Hub is reachable, or point model.name at a "
            "local copy") from None
    if skeleton is None:
        raise SkeletonUnavailable(f"the task plugin '{type(task).__name__}' builds no skeleton for this model")
    return skeleton


# -- adapters that train nothing ---------------------------------------------------------------------
def adapted_modules(skeleton: TaskModel, config) -> list[tuple[str, bool, list[str]]]:
    """(component, trained, the modules peft adapts in it) for each component of the skeleton ("" the whole
    model), matched with peft's own `check_target_module_exists`, exclusions and layer indexes included."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from finetune.modules import is_within

    names = [name for name, _ in skeleton.model.named_modules() if name]
    adapted = [name for name in names if check_target_module_exists(config, name)]
    return [(component, not (component and is_within(component, skeleton.frozen)),
             [name for name in adapted if not component or is_within(name, [component])])
            for component in skeleton.components or [""]]


def adapter_problems(skeleton: TaskModel, config) -> list[tuple[str, str]]:
    """(recipe key, message) for each trained component in which the adapter matches no module."""
    import dataclasses

    problems = []
    for component, trained, adapted in adapted_modules(skeleton, config):
        if not trained or adapted:
            continue
        where = f"the {component}" if component else "the model"
        targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else config.target_modules
        layers = getattr(config, "layers_to_transform", None)
        if layers is not None:
            without = dataclasses.replace(config, layers_to_transform=None, layers_pattern=None)
            if dict(((c, a) for c, _, a in adapted_modules(skeleton, without)))[component]:
                problems.append(("method.options.layers_to_transform", (
                    f"method.options.layers_to_transform: {layers} selects no layer of {where} holding the targets "
                    f"{targets}, so LoRA would train nothing there; its layers are numbered "
                    f"{_layer_range(skeleton, component, without)}. Pick layers in that range, or remove the key.")))
                continue
        problems.append(("method.options.target_modules", (
            f"method.options.target_modules: {targets} match no module of {where}, which this recipe trains, so LoRA "
            f"would train nothing in it. Its modules an adapter can take are named: "
            f"{', '.join(adaptable_names(skeleton.model, component)) or 'none'}. Add the ones to adapt to "
            "method.options.target_modules (names match as suffixes of the module's qualified name).")))
    return problems


def adaptable_names(model, component: str) -> list[str]:
    """The distinct last names of the layers peft's LoRA can adapt (linear, convolution, embedding) in `component`."""
    import torch

    root = model.get_submodule(component) if component else model
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    names = [name.rpartition(".")[2] for name, module in root.named_modules() if name and isinstance(module, kinds)]
    return list(dict.fromkeys(names))


def _layer_range(skeleton: TaskModel, component: str, config) -> str:
    import re

    adapted = dict((c, a) for c, _, a in adapted_modules(skeleton, config))[component]
    indexes = sorted({int(m.group("idx")) for m in (re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", n) for n in adapted) if m})
    return f"{indexes[0]}..{indexes[-1]}" if indexes else "(none found)"


def validate_adapters(recipe) -> list[str]:
    """For `finetune validate`: the adapter check, when the recipe names the targets itself (a method's
    `Options` field in `BaseMethod.validated_keys`, given in the recipe) and the model is a local folder. It then
    imports torch and the model's library; a recipe that keeps the task's default targets imports nothing."""
    from finetune import plugins
    from finetune.sources import resolve_model_source

    if recipe.task_options is None or recipe.method_options is None:
        return []  # their options are wrong: already reported
    method_cls = plugins.load(plugins.METHODS, recipe.method.name)
    given = set(recipe.method.options or {})
    if not given & set(getattr(method_cls, "validated_keys", ())):
        return []
    try:
        source = resolve_model_source(recipe.model.name, recipe.base_dir)
    except FinetuneError:
        return []  # the run reports it
    if not Path(source).is_dir():
        return []  # on the Hub: `finetune check` says so
    task = plugins.load(plugins.TASKS, recipe.task.name)(recipe.task_options)
    try:
        skeleton = build_skeleton(task, source, recipe.model.revision)
        config = method_cls(recipe.method_options).adapter_config(skeleton)
    except (SkeletonUnavailable, FinetuneError):
        return []  # `finetune check` and the run say why
    return [message for _, message in adapter_problems(skeleton, config)]
