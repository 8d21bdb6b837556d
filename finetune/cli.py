"""The `finetune` command. Heavy libraries are imported inside the commands that need them,
so `finetune --help`, `validate` and `plugins` stay fast."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import click

from finetune import __version__
from finetune.errors import FinetuneError

OVERRIDE_HELP = "Override a recipe key, e.g. --set train.lr=3e-4 (repeatable; the value is read as YAML)."


def user_errors(command):
    """Show FinetuneError as one clean message and exit 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="finetune")
def main():
    """Config-driven transfer learning: one recipe, three methods, a model card."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--resume", is_flag=True, help="Continue the run from its latest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train with this many processes (data parallel, real gradient synchronisation).")
@user_errors
def run(recipe, overrides, resume, overwrite, processes):
    """Fine-tune, evaluate and write the model and its card, as RECIPE says."""
    from finetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        from finetune.rundir import RunLayout

        # Checked once here, so a refusal is one message rather than one per process.
        RunLayout(loaded.run_dir).check_startable(loaded.to_yaml(), resume=resume, overwrite=overwrite)
        sys.exit(_launch(processes))

    from finetune.pipeline import run as run_pipeline

    summary = run_pipeline(loaded, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@user_errors
def validate(recipe, overrides):
    """Check RECIPE without loading any model: keys, types, plugins, their options, data files."""
    from finetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    click.echo(f"{recipe}: valid ({loaded.task.name} with {loaded.method.name}, writes to {loaded.run_dir})")


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


def _launch(processes: int) -> int:
    """Re-run this very command under torch.distributed.run, one process per rank.

    On a machine without a GPU each rank trains on the CPU and gradients are averaged over gloo."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "finetune", *sys.argv[1:]]
    return subprocess.call(command, env=env)


def _print_summary(summary) -> None:
    click.echo("")
    for split, values in summary.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        click.echo(f"{split}: {shown}")
    click.echo(f"model: {summary.model_dir}")
    click.echo(f"card:  {summary.card}")
