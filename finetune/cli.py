"""The `finetune` command. Heavy libraries are imported inside the commands that need them,
so `finetune --help`, `validate` and `plugins` stay fast."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from finetune import __version__
from finetune.errors import FinetuneError

OVERRIDE_HELP = "Override a recipe key, e.g. --set train.lr=3e-4 (repeatable; the value is read as YAML)."


def user_errors(command):
    """Show FinetuneError as one clean message, secrets masked (finetune.redaction), and exit 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            from finetune.redaction import redact

            raise click.ClickException(redact(str(exc))) from None

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="finetune")
def main():
    """Config-driven transfer learning: one recipe, three methods, a model card."""


def _resume_mode(ctx, param, value):
    if value in (None, "latest", "auto"):
        return value
    raise click.BadParameter(f"it takes no value or `auto`, not '{value}'. Put it after the recipe: "
                             "finetune run RECIPE --resume [auto]")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[auto]", callback=_resume_mode,
              help="Continue the run from its latest complete checkpoint; `--resume auto`: resume when there is one, "
                   "start afresh when there is none (for requeued jobs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Processes per machine (data parallel, one per GPU); default 1, or the accelerate config's.")
@click.option("--accelerate-config", type=click.Path(dir_okay=False, exists=True),
              help="Launch with this accelerate config file (DDP, FSDP, DeepSpeed; see recipes/accelerate/).")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Machines in the job.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This machine's index, 0 to nnodes-1.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="Rendezvous address of node 0 (needed with --nnodes > 1).")
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU (CUDA, MPS, XPU) is available.")
@user_errors
def run(recipe, overrides, resume, overwrite, processes, accelerate_config, nnodes, node_rank, rdzv_endpoint, cpu):
    """Fine-tune, evaluate and write the model and its card, as RECIPE says."""
    from finetune.launch import Launch
    from finetune.recipe import load_recipe
    from finetune.rundir import AUTO, RunLayout
    from finetune import stopping
    from finetune.stopping import RESUMABLE, Preempted, stopping_gracefully

    resume = {None: False, "latest": True, "auto": AUTO}[resume]
    loaded = load_recipe(recipe, overrides)
    if resume == AUTO and RunLayout(loaded.run_dir).finished_with(loaded.to_yaml()):
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"{loaded.run_dir} holds this recipe's finished run: --resume auto has nothing to do.")
        return
    if LAUNCHED_ENV not in os.environ and node_rank == 0:
        _preflight(loaded)  # once, where the run is started, before anything is written
    if cpu:
        os.environ[FORCE_CPU_ENV] = "1"  # read by finetune.training.engine, here and in the launched processes
    launch = Launch(processes, accelerate_config, nnodes, node_rank, rdzv_endpoint, cpu)
    if launch.needed:
        if node_rank == 0:  # checked once, on the first machine, so a refusal is one message rather than one per process
            layout = RunLayout(loaded.run_dir)
            starts = layout.resolve_resume(loaded.to_yaml(), resume, overwrite)
            layout.check_startable(loaded.to_yaml(), resume=starts[0], overwrite=starts[1])
        status = launch.start(_run_arguments(click.get_current_context().params), {LAUNCHED_ENV: "1"})
        if status == 0 and loaded.hub.push and node_rank == 0:
            _push_after_run(loaded)  # once, from the first machine's launcher, after every rank has finished
        sys.exit(status)

    from finetune.pipeline import run as run_pipeline

    main_process = int(os.environ.get("RANK", "0")) == 0
    with stopping_gracefully():
        try:
            summary = run_pipeline(loaded, resume=resume, overwrite=overwrite)
        except Preempted as stopped:
            if main_process:
                click.echo(str(stopped), err=True)
            _leave(RESUMABLE)
        except KeyboardInterrupt:
            if not stopping.STOP.interrupted:  # a KeyboardInterrupt of some other origin
                raise
            _leave(RESUMABLE)  # stopped before training began, as the signal thread said
        late_signal = stopping.STOP.name
    if main_process:
        if late_signal:
            click.echo(f"finetune: {late_signal} came after the last training step; the run finished its outputs.", err=True)
        _print_summary(summary)
        if loaded.hub.push and LAUNCHED_ENV not in os.environ:
            _push_after_run(loaded)
    if "LOCAL_RANK" in os.environ:
        _leave(0)


def _preflight(recipe) -> None:
    """The fast checks of `finetune check` (finetune.checks.FAST_CHECKS): an error stops the run before a model is
    loaded or the run directory written, a warning is printed. The leakage audit is the run's own (data.deduplicate)."""
    from finetune.checks import FAST_CHECKS, run_checks

    findings = run_checks(recipe, FAST_CHECKS).findings
    for finding in findings:
        if finding.level == "warning":
            click.echo(f"warning: {finding.message}", err=True)
    errors = [finding.message for finding in findings if finding.level == "error"]
    if errors:
        raise FinetuneError("the run was not started (`finetune check RECIPE` shows the whole report):\n"
                            + "\n".join(f"- {message}" for message in errors))


def _leave(status: int) -> None:
    """End `finetune run` with `status`. A process of a launched run ends without the interpreter's teardown: gloo
    can abort there ("terminate called without an active exception", seen in a few percent of CPU runs), and the
    launcher then kills the main process in the middle of writing the outputs."""
    if "LOCAL_RANK" not in os.environ:
        sys.exit(status)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def card(run_dir):
    """Rewrite RUN_DIR/README.md and its pictures from the run directory alone (no retraining)."""
    from finetune.card import write_card

    click.echo(f"card: {write_card(Path(run_dir))}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--repo-id", help="Hub repo (user/name); default: the recipe's hub.repo_id.")
@click.option("--revision", help="Branch to commit to (created when missing); default: the recipe's hub.revision.")
@click.option("--private/--public", default=None, help="Visibility of a new repo; default: the recipe's hub.private.")
@click.option("--artifacts", type=click.Choice(["adapter", "merged", "both"]),
              help="LoRA runs: push the adapter, the merged model, or both; default: the recipe's hub.artifacts.")
@click.option("--include", multiple=True, type=click.Choice(["logs", "checkpoints", "metrics"]),
              help="Also push these run files (repeatable); default: the recipe's hub.include.")
@click.option("--message", help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List what would be pushed, where, and the card's metadata; send nothing.")
@user_errors
def push(run_dir, repo_id, revision, private, artifacts, include, message, dry_run):
    """Push a finished run (model, card, pictures) to the Hugging Face Hub as one commit."""
    from finetune.rundir import read_run

    target = _target_from(read_run(Path(run_dir)).recipe.hub)
    if repo_id is None and target.repo_id is None:
        raise click.UsageError("name the repo: --repo-id user/name (the run's recipe has no hub.repo_id)")
    overrides = {"repo_id": repo_id, "revision": revision, "private": private, "artifacts": artifacts,
                 "include": list(include) or None, "commit_message": message}
    for key, value in overrides.items():
        if value is not None:
            setattr(target, key, value)
    _push(Path(run_dir), target, dry_run=dry_run)


DEVICES = click.Choice(["auto", "cpu", "cuda", "mps"])


@main.command()
@click.argument("source", metavar="RUN_DIR_OR_HUB_ID")
@click.argument("inputs", nargs=-1)
@click.option("--input-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the inputs from a csv, jsonl or parquet file (one per row).")
@click.option("--column", help="The input file's column that holds the inputs; default: the task's (text, image, prompt).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results here as JSON lines (default: print them). Generated images go into a folder "
                   "named after it (out.jsonl: out/).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classifiers: list the K best classes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="auto: a GPU when there is one.")
@click.option("--merged", is_flag=True, help="Use the run's model-merged/ rather than its adapter.")
@click.option("--skip-bad", is_flag=True, help="Leave out bad inputs (each is reported) rather than stop at the first.")
@click.option("--seed", type=int, default=0, show_default=True, help="Text to image: the first prompt's seed (then +1 ...).")
@click.option("--steps", type=click.IntRange(min=1), help="Text to image: denoising steps; default: the run's sample steps.")
@click.option("--guidance", type=float, help="Text to image: guidance scale; default: the run's.")
@click.option("--revision", help="A Hub repo's branch, tag or commit (default: main).")
@user_errors
def predict(source, inputs, input_file, column, output, top_k, batch_size, device, merged, skip_bad, seed, steps, guidance,
            revision):
    """Predict with a run's model (its directory, or the Hub repo it was pushed to): texts, image files or
    folders, prompts (INPUTS), or --input-file."""
    from finetune.api import PredictOptions
    from finetune.predict import predict_command

    if bool(inputs) == bool(input_file):
        raise click.UsageError("give the inputs as arguments or with --input-file (one of the two)")
    if column and not input_file:
        raise click.UsageError("--column names a column of --input-file")
    options = PredictOptions(device=_device(device), top_k=top_k, seed=seed, steps=steps, guidance=guidance)
    records, skipped, files = predict_command(source, list(inputs), input_file, column, output, options, merged=merged,
                                              batch_size=batch_size, skip_bad=skip_bad, revision=revision)
    for message in skipped:
        click.echo(f"skipped {message}", err=True)
    if output is None:
        import json

        for record in records:
            click.echo(json.dumps(record, ensure_ascii=False))
    else:
        click.echo(f"predictions: {output} ({len(records)} inputs{', ' + str(len(skipped)) + ' skipped' if skipped else ''})"
                   + (f"; files in {files}" if files else ""), err=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--data", required=True, help="Labelled data: a csv / jsonl / parquet file, a folder, or a Hub dataset id.")
@click.option("--split", default="test", show_default=True, help="The split of --data to score (a file is this split).")
@click.option("--name", help="Saved as RUN_DIR/evaluations/NAME.json; default: from --data and --split.")
@click.option("--update-card", is_flag=True, help="Add the results to the card and its model-index.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--merged", is_flag=True, help="Score the run's model-merged/ rather than its adapter.")
@click.option("--skip-bad", is_flag=True, help="Leave out bad rows (each is reported) rather than stop at the first.")
@user_errors
def evaluate(run_dir, data, split, name, update_card, batch_size, device, merged, skip_bad):
    """Score RUN_DIR's model on new labelled data with the run's task and metrics."""
    from finetune.evaluations import evaluate_run

    path, metrics, skipped = evaluate_run(Path(run_dir), data, split=split, name=name, merged=merged, in_card=update_card,
                                          batch_size=batch_size, device=_device(device), skip_bad=skip_bad)
    for message in skipped:
        click.echo(f"skipped {message}", err=True)
    click.echo("  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    click.echo(f"evaluation: {path}")
    if update_card:
        from finetune.card import write_card

        click.echo(f"card: {write_card(Path(run_dir))}")


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--merged", is_flag=True, help="Adapter methods (LoRA): fold the adapter into its base, into RUN_DIR/model-merged/.")
@click.option("--onnx", is_flag=True, help="Classifiers: RUN_DIR/onnx/model.onnx (merged for LoRA), checked against PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model-merged/ or onnx/.")
@user_errors
def export(run_dir, merged, onnx, overwrite):
    """Export a finished run's model after the fact: the merged model, or ONNX (needs finetune[export])."""
    from finetune.export import export as export_run

    if not (merged or onnx):
        raise click.UsageError("name what to export: --merged, --onnx, or both")
    for line in export_run(Path(run_dir), merged=merged, onnx=onnx, overwrite=overwrite):
        click.echo(line)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@user_errors
def validate(recipe, overrides):
    """Check RECIPE without loading any model: keys, types, plugins, their options, data files."""
    from finetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    click.echo(f"{recipe}: valid ({loaded.task.name} with {loaded.method.name}, writes to {loaded.run_dir})")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def check(recipe, overrides, as_json):
    """Everything that can fail, before anything trains: the data, leaks between splits, memory per method,
    adapters that would train nothing, the Hub token. Exit 0: clean; 1: errors; 4: warnings only."""
    from finetune.checks import run_checks
    from finetune.recipe import load_recipe

    report = run_checks(load_recipe(recipe, overrides), recipe_name=recipe)
    if as_json:
        import json

        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        from rich.console import Console

        report.render(Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160))  # piped: no cut columns
    sys.exit(report.exit_code)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--methods", help="Comma-separated methods to compare (feature-extraction,lora,full); default: the recipe's.")
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2",
              help="Run each value of a recipe key (repeatable: every combination); a method.options key applies only "
                   "to the methods that have that option.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--processes", type=click.IntRange(min=1), default=None, help="Processes per variant, as `finetune run --processes`.")
@click.option("--cpu", is_flag=True, help="Train every variant on the CPU.")
@click.option("--overwrite", is_flag=True, help="Rerun from scratch the variants whose recipe changed since they ran.")
@click.option("--dry-run", is_flag=True, help="List the variants, what would happen to each and its command; run nothing.")
@user_errors
def compare(recipe, methods, grids, overrides, processes, cpu, overwrite, dry_run):
    """Run RECIPE once per variant (methods × grid values) into <run dir>/compare/, then write report.md,
    report.json and a Pareto plot. Finished variants are skipped and interrupted ones resume."""
    from finetune.compare import Stopped, compare as compare_variants

    chosen = [m.strip() for m in (methods or "").split(",") if m.strip()]
    try:
        report = compare_variants(Path(recipe), chosen, list(grids), list(overrides), processes=processes, cpu=cpu,
                                  overwrite=overwrite, dry_run=dry_run, echo=click.echo)
    except Stopped as stopped:
        click.echo(str(stopped), err=True)
        sys.exit(75)
    if report is not None:
        click.echo(f"\nreport: {report}")


@main.command(name="plugins")
def list_plugins():
    """List installed task and method plugins, and any that failed to load."""
    from finetune.plugins import inventory

    rows = inventory()
    if not rows:
        click.echo("No plugins installed.")
    for row in rows:
        status = "ok" if row.error is None else "FAILED"
        click.echo(f"{row.kind:<7} {row.name:<24} {row.distribution} {row.version:<10} {status}")
        if row.error:
            click.echo(f"        {row.error}")


PUSH_FAILED = 3  # `finetune run`: trained and saved, but the push failed
FORCE_CPU_ENV = "FINETUNE_CPU"  # --cpu; accelerate's launchers rewrite ACCELERATE_USE_CPU, so finetune has its own
LAUNCHED_ENV = "FINETUNE_LAUNCHED"  # set for the processes a launcher starts: the launcher pushes


def _push_after_run(recipe) -> None:
    from finetune.hub import PushError, retry_command

    target = _target_from(recipe.hub)
    try:
        _push(recipe.run_dir, target)
    except (FinetuneError, OSError) as exc:
        from finetune.redaction import redact

        click.echo(f"\nThe run is trained and saved, but the push did not happen: {redact(str(exc))}", err=True)
        if not isinstance(exc, PushError):  # a PushError already says how to retry
            click.echo(f"Retry with: {retry_command(recipe.run_dir, target)}", err=True)
        sys.exit(PUSH_FAILED)


def _target_from(hub):
    from finetune.hub import PushTarget

    return PushTarget(repo_id=hub.repo_id, revision=hub.revision, private=hub.private, artifacts=hub.artifacts,
                      include=list(hub.include), commit_message=hub.commit_message)


def _push(run_dir: Path, target, dry_run: bool = False) -> None:
    from finetune.hub import prepare_push, preview_deleted, push

    plan = prepare_push(run_dir, target)
    if dry_run:
        preview_deleted(plan)
        click.echo(plan.describe())
        return
    _check_round_trip(run_dir, target.artifacts)
    click.echo(f"Pushing {len(plan.files)} files to {target.repo_id} ({target.revision}) ...")
    click.echo(f"pushed: {push(plan)}")
    if plan.deleted:
        click.echo(f"deleted {len(plan.deleted)} files an earlier push put there: {', '.join(plan.deleted)}")


def _check_round_trip(run_dir: Path, artifacts: str) -> None:
    """Before a push: each artifact, reloaded as its card says, predicts what the run predicted (finetune.predict)."""
    from finetune.hub import PushError
    from finetune.predict import artifact_of, check_round_trip
    from finetune.rundir import read_run

    run = read_run(run_dir)
    chosen = {"adapter": [False], "merged": [True], "both": [True, False]}[artifacts]
    click.echo("Checking that the model reloads as its card says ...", err=True)
    problems, warnings = check_round_trip(run, [artifact_of(run, merged=merged) for merged in chosen])
    for warning in warnings:
        click.echo(f"warning: {warning} The push goes ahead unchecked.", err=True)
    if problems:
        raise PushError(f"the push was not sent: {'; '.join(problems)}. The saved model does not match the trained one "
                        "(a file changed or missing, or a card snippet out of date): rerun the recipe, or write the "
                        "merged copy again with `finetune export RUN --merged --overwrite`.")


def _run_arguments(params: dict) -> list[str]:
    """This `finetune run` command line, rebuilt from its parsed options (for the launched processes): the
    same whether it came from a shell or from `main([...])` in Python."""
    arguments = ["run", str(Path(params["recipe"]).resolve())]
    for override in params["overrides"]:
        arguments += ["--set", override]
    if params["resume"]:
        arguments += ["--resume", params["resume"]]
    for flag in ("overwrite", "cpu"):
        if params[flag]:
            arguments.append(f"--{flag}")
    for option in ("processes", "accelerate_config", "nnodes", "node_rank", "rdzv_endpoint"):
        if params[option] is not None:
            arguments += [f"--{option.replace('_', '-')}", str(params[option])]
    return arguments


def _print_summary(summary) -> None:
    click.echo("")
    for split, values in summary.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        click.echo(f"{split}: {shown}")
    click.echo(f"model: {summary.model_dir}")
    click.echo(f"card:  {summary.card}")
