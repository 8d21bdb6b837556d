"""The model card: README.md in the run directory, rendered from the run directory alone by
huggingface_hub's ModelCard from a Jinja template in cards/ (or the task plugin's own), with
the Hub's metadata (model-index eval results included) and pictures in images/.

The same renderer writes the card pushed to the Hub; there the usage snippet loads the repo.
"""

from __future__ import annotations

from pathlib import Path

import finetune
from finetune import figures, plugins
from finetune.api import SMALL_SPLIT, Artifact, CardInfo, RunRecord
from finetune.recipe import lower_is_better
from finetune.files import write_text
from finetune.rundir import RunLayout, read_run

CURVES = "training-curves.png"


def cards_dir() -> Path:
    """Templates: cards/ in a source checkout, finetune/_cards in an installed wheel."""
    package = Path(finetune.__file__).parent
    for candidate in (package / "_cards", package.parent / "cards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the card templates (cards/) are missing from this installation")


def write_card(root: Path) -> Path:
    """(Re)write README.md and its pictures from what the run directory holds."""
    run = read_run(root)
    layout = RunLayout(run.root)
    write_text(layout.card, render_card(run, local_artifacts(run)))
    return layout.card


def method_of(run: RunRecord):
    """The run's method plugin (its class: what it says of itself, not a trained instance)."""
    return plugins.load(plugins.METHODS, run.recipe.method.name)


def local_artifacts(run: RunRecord) -> list[Artifact]:
    """The run's model, then its merged copy when the run wrote one."""
    layout = RunLayout(run.root)
    adapter = method_of(run).produces_adapter
    artifacts = [Artifact(str(layout.model), adapter=adapter)]
    if adapter and layout.merged.is_dir():
        artifacts.append(Artifact(str(layout.merged), adapter=False))
    return artifacts


def render_card(run: RunRecord, artifacts: list[Artifact]) -> str:
    """The card of `artifacts[0]`; further artifacts (a merged copy) get a usage snippet each."""
    from huggingface_hub import ModelCard

    recipe = run.recipe
    task = plugins.load(plugins.TASKS, recipe.task.name)(recipe.task_options)
    infos = [task.card(run, artifact) for artifact in artifacts]
    info, artifact = infos[0], artifacts[0]
    curves = figures.training_curves(run.steps, run.images_dir / CURVES)
    summary = run.summary
    base = summary.get("base_model", {"name": recipe.model.name})
    template = Path(info.template) if info.template else cards_dir() / "model_card.md"
    card = ModelCard.from_template(
        card_data(run, info, artifact),
        template_path=str(template),
        model_name=recipe.name,
        base_model=base["name"],
        base_model_link=f"https://huggingface.co/{base['hub_id']}" if base.get("hub_id") else None,
        method=recipe.method.name,
        method_title=method_of(run).title,
        description=info.description,
        usage=info.usage,
        more_usage=[(a, i.usage) for a, i in zip(artifacts[1:], infos[1:])],
        sections=info.sections,
        data_sections=info.data_sections,
        results=summary["metrics"],
        evaluations=card_evaluations(run.root),
        split_sizes=summary["split_sizes"],
        trainable_params=summary["parameters"]["trainable"],
        total_params=summary["parameters"]["total"],
        data=_data_description(run),
        steps=summary["steps"],
        skipped_steps=summary.get("skipped_steps", 0),
        saved_weights=saved_weights(run),
        stopped_early=summary["stopped_early"],
        train_seconds=summary["train_seconds"],
        environment=summary.get("environment", {}),
        hyperparameters=_hyperparameters(run),
        history=summary["history"],
        curves=f"images/{CURVES}" if curves else None,
        limitations=[*limitations(run), *info.limitations],
        recipe_yaml=recipe.to_yaml(),
    )
    return str(card)


def card_data(run: RunRecord, info: CardInfo, artifact: Artifact):
    """The card's YAML metadata, as the Hub reads it."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe, summary = run.recipe, run.summary
    base = summary.get("base_model", {})
    data = summary.get("data", {})
    eval_results = [
        EvalResult(task_type=info.pipeline_tag, metric_type=name, metric_value=value, **_dataset_fields(run, split))
        for split, values in summary["metrics"].items()
        for name, value in values.items()
        if name != "loss"
    ] + [  # `finetune evaluate --update-card`: scored later, on other data
        EvalResult(task_type=info.pipeline_tag, metric_type=name, metric_value=value, **evaluation["dataset"])
        for evaluation in card_evaluations(run.root)
        for name, value in evaluation["metrics"].items()
    ]
    extra = {"base_model_relation": "adapter" if artifact.adapter else "finetune"} if base.get("hub_id") else {}
    return ModelCardData(
        model_name=recipe.name,
        base_model=base.get("hub_id"),
        datasets=[data["source"]] if data.get("source") else None,
        library_name=info.library_name,
        pipeline_tag=info.pipeline_tag,
        license=recipe.card.license or base.get("license"),
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        tags=list(dict.fromkeys(["finetune", recipe.task.name, recipe.method.name, *info.tags, *recipe.card.tags])),
        eval_results=eval_results or None,
        **extra,
    )


def card_evaluations(run_root: Path) -> list[dict]:
    """What `finetune evaluate --update-card` kept for the card: evaluations/NAME.json marked `in_card`, by name."""
    import json

    found = sorted(RunLayout(run_root).evaluations.glob("*.json"))
    return [{**record, "name": p.stem} for p in found if (record := json.loads(p.read_text())).get("in_card")]


def _dataset_fields(run: RunRecord, role: str) -> dict:
    """Which data a split's results come from: a Hub dataset id, or a local file and its hash."""
    recipe = run.recipe
    data = run.summary.get("data", {})
    carved = role == "eval" and data.get("eval_carved_from_train")
    split = recipe.data.train_split if carved else getattr(recipe.data, f"{role}_split", role)
    split_label = f"{split} (held-out {recipe.data.eval_fraction:.0%}, seed {recipe.train.seed})" if carved else split
    folder = data.get("folder")
    if folder:
        return {"dataset_type": folder["format"], "dataset_name": folder["name"], "dataset_split": split_label,
                "dataset_revision": f"sha256:{folder['sha256']}"}
    if recipe.data.path:
        return {"dataset_type": recipe.data.path, "dataset_name": recipe.data.path, "dataset_config": recipe.data.config,
                "dataset_split": split_label, "dataset_revision": recipe.data.revision}
    file = data.get("files", {}).get(split) or {"name": Path(recipe.data.files[split]).name, "format": "local"}
    return {"dataset_type": file["format"], "dataset_name": file["name"], "dataset_split": split_label,
            "dataset_revision": f"sha256:{file['sha256']}" if file.get("sha256") else None}


def _data_description(run: RunRecord) -> dict:
    return {**_data_source(run), "leakage": leakage_table(run.summary.get("data", {}).get("leakage"))}


def leakage_table(leakage: dict | None) -> dict | None:
    """The leakage audit of metrics.json (data.leakage) as the card's table; None for a run without one (older
    runs, data.deduplicate: none, a task that is not audited)."""
    if not leakage:
        return None
    near = leakage["near"]
    how = (f"MinHash over {near['shingle_words']}-word shingles, Jaccard similarity at least {near['threshold']}"
           if near["compare"] == "minhash" else f"perceptual hashes (phash) at most {near['max_distance']} bits apart")
    dropped = leakage.get("dropped", {})
    rows = [{"pair": name, **{k: counts[k] for k in ("exact", "near", "conflicting_labels")},
             "dropped": dropped.get(name.split("/")[1], 0) if name != "train/train" else "-"}
            for name, counts in leakage["pairs"].items()]
    return {"mode": leakage["mode"], "how": how, "rows": rows}


def _data_source(run: RunRecord) -> dict:
    recipe = run.recipe
    data = run.summary.get("data", {})
    folder = data.get("folder")
    if folder:
        return {"source": f"the local folder `{folder['name']}` ({folder['format']}, {folder['files']} files, "
                          f"sha256 of its contents `{folder['sha256']}`)", "files": []}
    if recipe.data.path:
        source = f"`{recipe.data.path}`" + (f" (config `{recipe.data.config}`)" if recipe.data.config else "")
        revision = f"revision `{recipe.data.revision}`" if recipe.data.revision else "latest revision (not pinned)"
        return {"source": f"{source}, {revision}", "files": []}
    return {"source": "local files", "files": [{"split": split, **facts} for split, facts in data.get("files", {}).items()]}


def limitations(run: RunRecord) -> list[str]:
    """What this run itself shows a reader should be careful about."""
    summary, recipe = run.summary, run.recipe
    notes = []
    for split in summary["metrics"]:
        n = summary["split_sizes"].get(split, 0)
        if 0 < n < SMALL_SPLIT:
            notes.append(f"The {split} split has only {n} examples: its metrics are rough estimates.")
    base = summary.get("base_model", {})
    if method_of(run).produces_adapter and base.get("origin", "hub") != "hub":
        notes.append(
            f"The base model was loaded from a local folder ({base['name']}), and the adapter refers to its base by "
            "that path (peft's adapter_config.json, the usage snippet): elsewhere, point it at the same weights."
        )
    leakage = summary.get("data", {}).get("leakage") or {}
    dropped = leakage.get("dropped", {})
    for name, counts in leakage.get("pairs", {}).items():
        role, shared = name.split("/")[1], counts["exact"] + counts["near"]
        if name != "train/train" and shared and not dropped.get(role):
            notes.append(f"{shared} of the {role} examples also appear in train ({counts['exact']} exactly, "
                         f"{counts['near']} nearly): the {role} scores may overstate how the model does on new data.")
    stop = recipe.eval.early_stopping
    if summary["stopped_early"] and stop is not None:
        notes.append(
            f"Training stopped early at step {summary['steps']}: eval {stop.metric} had not improved "
            f"for {stop.patience} evaluations."
        )
    history = summary["history"]
    metrics = [k for k in (history[0] if history else {}) if k not in ("step", "epoch", "loss")]
    watched = stop.metric if stop else (metrics[0] if metrics else None)
    saved_step = summary.get("model_step", history[-1]["step"] if history else None)
    saved = next((row for row in history if row["step"] == saved_step), None)
    keeps_best = stop is not None and stop.final_model == "best"  # then saved_weights() says which step and why
    if watched and saved and len(history) > 1 and not keeps_best:
        minimise = stop.minimise if stop else lower_is_better(watched)
        best = (min if minimise else max)(history, key=lambda row: row[watched])
        if best[watched] != saved[watched]:
            notes.append(
                f"The saved model is the final state (step {saved_step}, eval {watched} "
                f"{saved[watched]:.4f}); the best eval {watched}, {best[watched]:.4f}, was at step {best['step']}."
            )
    return notes


def saved_weights(run: RunRecord) -> str | None:
    """Which step's weights the artifact holds, and why, when that is not simply the last step."""
    summary, stop = run.summary, run.recipe.eval.early_stopping
    step, last = summary.get("model_step"), (summary["history"][-1]["step"] if summary["history"] else None)
    if stop is None or step is None:
        return None
    if step != last:
        row = next(r for r in summary["history"] if r["step"] == step)
        return (f"step {step}, the best evaluation (eval {stop.metric} {row[stop.metric]:.4f}), not the last one "
                f"(step {last}): eval.early_stopping.final_model is `best`.")
    return f"step {step}, the last step" + (", which was also the best evaluation." if summary.get("best_step") == step else ".")


def _hyperparameters(run: RunRecord) -> dict:
    recipe, summary = run.recipe, run.summary
    t = recipe.train
    processes = summary.get("environment", {}).get("processes", 1)
    changes = summary.get("lr_changes", [])
    lr = t.lr if not changes else f"{changes[0]['from']:g}" + "".join(
        f", {c['to']:g} from step {c['step'] + 1} (set on resume)" for c in changes)
    values = {
        "learning rate": lr,
        "batch size": f"{t.batch_size * t.grad_accum_steps * processes} examples per optimizer step "
                      f"({t.batch_size} per device × {t.grad_accum_steps} accumulation × {processes} "
                      f"process{'es' if processes != 1 else ''})",
        "epochs / max steps": t.max_steps or t.epochs,
        "scheduler": f"{t.scheduler}, warm-up {t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio}",
        "weight decay": t.weight_decay,
        "mixed precision": t.mixed_precision,
        "seed": t.seed,
    }
    options = recipe.method_options.model_dump() if recipe.method_options is not None else recipe.method.options
    values.update({f"{recipe.method.name}.{k}": v for k, v in options.items()})
    return values
