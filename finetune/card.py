"""The model card: README.md in the run directory, rendered by huggingface_hub's ModelCard
from a Jinja template in cards/, with Hub metadata (model-index eval results included)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import finetune
from finetune.api import CardInfo
from finetune.recipe import Recipe
from finetune.sources import PACKAGE_PREFIX

METHOD_TITLES = {
    "full": "a full fine-tune",
    "feature-extraction": "a trained head on the frozen features",
    "lora": "a LoRA adapter (with a trained head)",
}
_VERSIONED = ("finetune", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "timm", "diffusers")


def cards_dir() -> Path:
    """Templates: cards/ in a source checkout, finetune/_cards in an installed wheel."""
    package = Path(finetune.__file__).parent
    for candidate in (package / "_cards", package.parent / "cards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the card templates (cards/) are missing from this installation")


def render_card(recipe: Recipe, info: CardInfo, summary: dict, template: str = "model_card.md") -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = recipe.model.name
    on_hub = not base.startswith(PACKAGE_PREFIX) and not recipe.resolve(base).exists()
    dataset_id = recipe.data.path if recipe.data.path else None
    eval_results = [
        EvalResult(
            task_type=info.pipeline_tag,
            dataset_type=dataset_id or "local-files",
            dataset_name=dataset_id or ", ".join(Path(f).name for f in recipe.data.files.values()),
            dataset_config=recipe.data.config,
            dataset_split=split,
            metric_type=name,
            metric_value=value,
        )
        for split, values in summary["metrics"].items()
        for name, value in values.items()
        if name != "loss"
    ]
    card_data = ModelCardData(
        model_name=recipe.name,
        base_model=base if on_hub else None,
        datasets=[dataset_id] if dataset_id else None,
        library_name=info.library_name,
        pipeline_tag=info.pipeline_tag,
        license=recipe.card.license,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        tags=["finetune", recipe.task.name, recipe.method.name, *info.tags, *recipe.card.tags],
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(cards_dir() / template),
        model_name=recipe.name,
        base_model=base,
        base_model_link=f"https://huggingface.co/{base}" if on_hub else "#",
        method=recipe.method.name,
        method_title=METHOD_TITLES.get(recipe.method.name, f"a `{recipe.method.name}` fine-tune"),
        description=info.description,
        usage=info.usage,
        results=summary["metrics"],
        split_sizes=summary["split_sizes"],
        trainable_params=summary["parameters"]["trainable"],
        total_params=summary["parameters"]["total"],
        data_source=f"`{dataset_id}`" + (f" ({recipe.data.config})" if recipe.data.config else "")
        if dataset_id
        else ", ".join(f"`{Path(f).name}`" for f in recipe.data.files.values()),
        steps=summary["steps"],
        stopped_early=summary["stopped_early"],
        train_seconds=summary["train_seconds"],
        hyperparameters=_hyperparameters(recipe),
        history=summary["history"],
        recipe_yaml=recipe.to_yaml(),
        versions=_versions(),
    )
    return str(card)


def _hyperparameters(recipe: Recipe) -> dict:
    t = recipe.train
    values = {
        "learning rate": t.lr,
        "batch size": f"{t.batch_size} × {t.grad_accum_steps} accumulation",
        "epochs / max steps": t.max_steps or t.epochs,
        "scheduler": f"{t.scheduler}, warm-up {t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio}",
        "weight decay": t.weight_decay,
        "mixed precision": t.mixed_precision,
        "seed": t.seed,
    }
    options = recipe.method_options.model_dump() if recipe.method_options is not None else recipe.method.options
    values.update({f"{recipe.method.name}.{k}": v for k, v in options.items()})
    return values


def _versions() -> dict:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
