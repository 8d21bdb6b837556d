"""`finetune compare`: variants (methods × grid), a report whose numbers are the variants' own, the bootstrap
interval against a hand computation, the best-variant rule, and a resume that redoes no finished variant.

Each variant runs as `finetune run` in a process of its own (one process each, not a multi-process run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from finetune import testing
from finetune.cli import main
from finetune.compare_report import Row, choose, pareto_front

TINY = {"train": {"max_steps": 8, "batch_size": 16, "lr": 1e-3, "log_every_steps": 4, "seed": 7},
        "eval": {"every_steps": 4}, "checkpoint": {"every_steps": 4}}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_tiny_recipe(work: Path, model: Path, data: Path, method: str = "lora") -> Path:
    recipe = testing.text_recipe(model, data, work / "run", method, **TINY)
    return testing.write_recipe(work / "recipe.yaml", recipe)


def load(path: Path):
    return json.loads(path.read_text())


def files_of(folder: Path) -> dict:
    """path → (bytes, mtime_ns) of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, pretrained_distilbert, sentiment_dir) -> Path:
    """One compare of three methods, with a grid over LoRA's rank: four variants."""
    work = tmp_path_factory.mktemp("compare")
    recipe = write_tiny_recipe(work, pretrained_distilbert, sentiment_dir)
    result = invoke("compare", recipe, "--methods", "feature-extraction,lora,full", "--grid", "method.options.r=2,4")
    assert result.exit_code == 0, result.output
    assert "--grid method.options.r applies to lora only (feature-extraction, full have no such option" in result.output
    return work / "run" / "compare"


def test_a_grid_over_the_rank_makes_the_named_variants(compared):
    assert sorted(p.name for p in compared.iterdir() if p.is_dir() and p.name != "images") == [
        "feature-extraction", "full", "lora-r2", "lora-r4"]
    for rank in (2, 4):
        run = compared / f"lora-r{rank}"
        assert yaml.safe_load((run / "recipe.yaml").read_text())["method"]["options"]["r"] == rank
        assert load(run / "model" / "adapter_config.json")["r"] == rank  # the rank reached the model
    # A LoRA option is not given to the methods without it (full's Options would refuse it).
    assert yaml.safe_load((compared / "full" / "recipe.yaml").read_text())["method"] == {"name": "full", "options": {"backbone_lr": None}}


def test_the_report_holds_the_variants_own_numbers(compared):
    report = load(compared / "report.json")
    assert report["metric"] == "accuracy" and report["split"] == "test"  # the task's first default metric
    markdown = (compared / "report.md").read_text()
    assert [v["name"] for v in report["variants"]] == ["feature-extraction", "lora-r2", "lora-r4", "full"]
    for variant in report["variants"]:
        run = compared / variant["name"]
        summary = load(run / "metrics.json")
        assert variant["metric"] == summary["metrics"]["test"]["accuracy"]
        assert variant["parameters"] == {k: summary["parameters"][k] for k in ("trainable", "total")}
        assert variant["train_seconds"] == summary["train_seconds"]
        assert variant["peak_memory_mb"] == summary["peak_memory_mb"]
        assert variant["artifact_bytes"] == sum(os.path.getsize(Path(d, f)) for d, _, fs in os.walk(run / "model") for f in fs)
        low, high = variant["interval"]
        assert low <= variant["metric"] <= high and low < high  # Wilson's interval does not collapse at 1.0
        row = (f"| {variant['name']} | {variant['metric']:.4f} | {low:.4f} – {high:.4f} | "
               f"{variant['parameters']['trainable']:,} | {variant['parameters']['total']:,} | {variant['train_seconds']:g} | ")
        assert row in markdown
        assert f"{variant['artifact_bytes']:,} | started |" in markdown
    full = next(v for v in report["variants"] if v["name"] == "full")
    assert full["parameters"]["trainable"] == full["parameters"]["total"]
    assert (compared / "images" / "pareto.png").stat().st_size > 1000 and "![accuracy" in markdown


def test_the_accuracy_interval_is_wilsons(compared):
    # By hand, from the counts in predictions.json: k of n right, z = 1.96.
    for variant in load(compared / "report.json")["variants"]:
        saved = load(compared / variant["name"] / "predictions.json")["test"]
        n = len(saved["references"])
        k = sum(p == r for p, r in zip(saved["predictions"], saved["references"]))
        assert n == 40 == variant["examples"] and variant["metric"] == k / n
        z, p = 1.96, k / n
        centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
        assert variant["interval"] == pytest.approx([(centre - half) / (1 + z * z / n), min(1.0, (centre + half) / (1 + z * z / n))],
                                                    abs=1e-12)


def test_another_metric_gets_the_documented_bootstrap(compared):
    # F1 (the run's second metric, binary) by hand: 1000 resamples of the 40 test examples from default_rng(0),
    # F1 = 2TP / (2TP + FP + FN) in numpy (not the metric's scikit-learn code), the 2.5th / 97.5th percentiles.
    from finetune.compare_report import metric_interval
    from finetune.recipe import load_recipe

    run = compared / "lora-r4"
    recipe = load_recipe(run / "recipe.yaml", ["eval.metrics=[f1]"], cross_check=False)
    interval, method = metric_interval(run, recipe, load(run / "metrics.json"), "test", "f1")
    saved = load(run / "predictions.json")["test"]
    predicted, truth = np.array(saved["predictions"]), np.array(saved["references"])
    rng = np.random.default_rng(0)

    def f1(i):
        tp = np.sum((predicted[i] == 1) & (truth[i] == 1))
        wrong = np.sum(predicted[i] != truth[i])
        return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0

    values = [f1(rng.integers(0, 40, size=40)) for _ in range(1000)]
    assert method.startswith("percentile bootstrap, 1000 resamples")
    assert interval == pytest.approx(list(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    assert interval[0] <= load(run / "metrics.json")["metrics"]["test"]["f1"] <= interval[1]


def test_the_best_variant_follows_the_rule_on_the_reported_numbers(compared):
    report = load(compared / "report.json")
    variants = report["variants"]
    top = max(variants, key=lambda v: (v["metric"], -v["parameters"]["trainable"]))
    within = [v for v in variants if v["metric"] >= top["interval"][0]]
    expected = min(within, key=lambda v: (v["parameters"]["trainable"], v["train_seconds"]))
    assert report["best"] == expected["name"] and report["best_metric"] == top["name"]
    assert f"**{expected['name']}**" in (compared / "report.md").read_text()


def row(name: str, metric: float, trainable: int, interval=None, seconds: float = 1.0) -> Row:
    return Row(name=name, method=name, settings={}, status="", run_dir=Path(name), metric=metric, interval=interval,
               interval_method="", examples=40, trainable=trainable, total=1000, train_seconds=seconds,
               peak_memory_mb={}, artifact_bytes=0)


def test_the_rule_picks_the_cheapest_within_the_best_interval():
    rows = [row("full", 0.90, 1000, [0.85, 0.95]), row("lora", 0.86, 50, [0.80, 0.92]), row("head", 0.80, 2, [0.7, 0.9])]
    top, best = choose(rows, higher_is_better=True)
    assert (top.name, best.name) == ("full", "lora")  # not the best metric, nor the cheapest overall
    assert [r.name for r in pareto_front(rows, True)] == ["head", "lora", "full"]
    # A loss: lower is better, and the interval's upper end bounds what is within it.
    losses = [row("full", 0.20, 1000, [0.15, 0.25]), row("lora", 0.24, 50), row("head", 0.26, 2)]
    assert choose(losses, higher_is_better=False)[1].name == "lora"
    # Two within the interval with the same parameters: the shorter training wins.
    ties = [row("a", 0.9, 10, [0.8, 1.0], seconds=5.0), row("b", 0.85, 10, [0.8, 0.9], seconds=2.0)]
    assert choose(ties, higher_is_better=True)[1].name == "b"


def test_an_interrupted_compare_resumes_without_redoing_finished_variants(tmp_path, pretrained_distilbert, sentiment_dir):
    recipe = write_tiny_recipe(tmp_path, pretrained_distilbert, sentiment_dir)
    first = invoke("compare", recipe, "--methods", "feature-extraction,lora")
    assert first.exit_code == 0, first.output
    compare_dir = tmp_path / "run" / "compare"
    finished, lora = compare_dir / "feature-extraction", compare_dir / "lora"
    uninterrupted = load(lora / "metrics.json")

    # The LoRA variant killed right after its step-4 checkpoint: no outputs, no later checkpoint.
    shutil.rmtree(lora / "checkpoints" / "step-00000008")
    for name in testing.RUN_OUTPUTS:
        target = lora / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    before = files_of(finished)
    kept_checkpoint = files_of(lora / "checkpoints" / "step-00000004")

    again = invoke("compare", recipe, "--methods", "feature-extraction,lora")
    assert again.exit_code == 0, again.output
    statuses = {v["name"]: v["status"] for v in load(compare_dir / "report.json")["variants"]}
    assert statuses == {"feature-extraction": "skipped (finished)", "lora": "resumed"}
    assert files_of(finished) == before  # not retrained: the very files, not rewritten
    assert files_of(lora / "checkpoints" / "step-00000004") == kept_checkpoint  # resumed from it, not restarted
    resumed = load(lora / "metrics.json")
    assert resumed["metrics"] == uninterrupted["metrics"] and resumed["history"] == uninterrupted["history"]

    # A changed recipe is refused, naming the variants and the key; --overwrite would rerun them.
    changed = invoke("compare", recipe, "--methods", "feature-extraction,lora", "--set", "train.lr=0.002")
    assert changed.exit_code == 1 and "Traceback" not in changed.output
    assert "feature-extraction (train.lr); lora (train.lr)" in changed.output and "--overwrite" in changed.output
    planned = invoke("compare", recipe, "--methods", "feature-extraction,lora", "--set", "train.lr=0.002", "--overwrite",
                     "--dry-run")
    assert planned.exit_code == 0 and planned.output.count("rerun (--overwrite)") == 2
    assert files_of(finished) == before


def test_user_errors_are_one_paragraph(tmp_path, pretrained_distilbert, sentiment_dir):
    recipe = write_tiny_recipe(tmp_path, pretrained_distilbert, sentiment_dir)
    for args, message in [
        (["--methods", "full", "--grid", "method.options.r=4,8"], "--grid method.options.r: none of the methods compared (full)"),
        (["--grid", "train.lr"], "--grid 'train.lr': expected KEY=V1,V2,..."),
        (["--methods", "full,lorra"], "--methods: "),
        (["--set", "method.name=full"], "--set method.name: a compare sets it for each variant; name the methods with --methods."),
    ]:
        result = invoke("compare", recipe, *args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()  # nothing ran


def test_text_to_image_is_compared_on_its_validation_loss(tmp_path):
    # No metric: the eval loss, with the bootstrap of its items-weighted mean over example_losses.json.
    sd = testing.tiny_stable_diffusion(tmp_path / "sd")
    captions = testing.write_captioned_folder(tmp_path / "captions", testing.captioned_images(16, size=24))
    recipe = testing.write_recipe(tmp_path / "sd.yaml", testing.text_to_image_recipe(
        sd, captions, tmp_path / "run", "lora"))
    refused = invoke("compare", recipe, "--methods", "feature-extraction,lora")
    assert refused.exit_code == 1 and "variant feature-extraction: " in refused.output
    assert "does not support the method 'feature-extraction'" in refused.output and not (tmp_path / "run").exists()

    result = invoke("compare", recipe, "--methods", "lora,full")
    assert result.exit_code == 0, result.output
    report = load(tmp_path / "run" / "compare" / "report.json")
    assert (report["metric"], report["split"], report["higher_is_better"]) == ("loss", "eval", False)
    assert [v["name"] for v in report["variants"]] == ["lora", "full"]
    for variant in report["variants"]:
        run = tmp_path / "run" / "compare" / variant["name"]
        pairs = np.array(load(run / "example_losses.json")["eval"])
        assert len(pairs) == variant["examples"] == 4
        loss = load(run / "metrics.json")["metrics"]["eval"]["loss"]
        assert variant["metric"] == loss == pytest.approx(pairs[:, 0].sum() / pairs[:, 1].sum(), rel=1e-12)
        rng = np.random.default_rng(0)
        draws = [rng.integers(0, 4, size=4) for _ in range(1000)]
        values = [pairs[i, 0].sum() / pairs[i, 1].sum() for i in draws]
        assert variant["interval"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    top = min(report["variants"], key=lambda v: v["metric"])
    within = [v for v in report["variants"] if v["metric"] <= top["interval"][1]]
    assert report["best"] == min(within, key=lambda v: (v["parameters"]["trainable"], v["train_seconds"]))["name"]


@pytest.mark.slow
def test_processes_launch_each_variant_as_finetune_run_does(tmp_path, pretrained_distilbert, sentiment_dir):
    recipe = write_tiny_recipe(tmp_path, pretrained_distilbert, sentiment_dir)
    result = invoke("compare", recipe, "--methods", "feature-extraction,lora", "--processes", "2", "--cpu")
    assert result.exit_code == 0, result.output
    compare_dir = tmp_path / "run" / "compare"
    for variant in load(compare_dir / "report.json")["variants"]:
        assert "--processes 2 --cpu" in variant["command"]
        checksums = load(compare_dir / variant["name"] / "metrics.json")["rank_checksums"]  # written by 2 ranks only
        assert len(checksums) == 2 and checksums[0] == checksums[1]
        # Per-example losses gathered from both ranks, without the examples repeated to fill the last batch.
        pairs = np.array(load(compare_dir / variant["name"] / "example_losses.json")["test"])
        loss = load(compare_dir / variant["name"] / "metrics.json")["metrics"]["test"]["loss"]
        assert len(pairs) == 40 and pairs[:, 0].sum() / pairs[:, 1].sum() == pytest.approx(loss, rel=1e-12)


def test_image_classification_is_compared_on_accuracy(tmp_path):
    model = testing.tiny_timm_model(tmp_path / "model", "test_resnet")
    data = testing.write_image_folder(tmp_path / "colors", {"train": testing.color_images(40, seed=1),
                                                            "test": testing.color_images(20, seed=2)})
    recipe = testing.write_recipe(tmp_path / "image.yaml", testing.image_recipe(model, data, tmp_path / "run", "full",
                                                                                train={"epochs": 2}))
    result = invoke("compare", recipe, "--methods", "feature-extraction,lora")  # the text test has all three
    assert result.exit_code == 0, result.output
    report = load(tmp_path / "run" / "compare" / "report.json")
    assert (report["metric"], report["split"]) == ("accuracy", "test") and len(report["variants"]) == 2
    for variant in report["variants"]:
        summary = load(tmp_path / "run" / "compare" / variant["name"] / "metrics.json")
        assert variant["metric"] == summary["metrics"]["test"]["accuracy"] and variant["examples"] == 20
        assert variant["parameters"]["trainable"] == summary["parameters"]["trainable"]


@pytest.mark.parametrize("status, exit_code, message", [
    (75, 75, "variant feature-extraction was stopped by a signal after a checkpoint. Run the same `finetune compare`"),
    (1, 1, "variant feature-extraction: `finetune run` ended with status 1"),
])
def test_a_stopped_or_failed_variant_ends_the_compare(status, exit_code, message, tmp_path, monkeypatch, distilbert_dir,
                                                      sentiment_dir):
    import finetune.compare

    started = []
    monkeypatch.setattr(finetune.compare, "run_variant", lambda recipe, variant, **kw: started.append(variant.name) or status)
    recipe = write_tiny_recipe(tmp_path, distilbert_dir, sentiment_dir)
    result = invoke("compare", recipe, "--methods", "feature-extraction,lora")
    assert result.exit_code == exit_code and message in result.output and "Traceback" not in result.output
    assert started == ["feature-extraction"]  # the next variant does not start
