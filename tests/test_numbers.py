"""Reference-equivalence tests: every number a run reports equals the mathematically equivalent run.

Batch b × accumulation k against batch b·k, N processes against one, a resumed run against the
uninterrupted one, logged learning rates against the closed form, the saved model of an early-
stopped run against its best checkpoint. Dropout is off so that runs can be compared number for
number; the data order is the same in each pair (the seeded sampler permutes examples, not batches).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main
from finetune.stopping import RESUMABLE
from finetune.training.steplog import read_steplog


@pytest.fixture(scope="session")
def exact_model(tmp_path_factory) -> Path:
    return testing.tiny_text_model(tmp_path_factory.mktemp("tiny-distilbert-no-dropout"), "distilbert", dropout=0.0)


def data_dir(root: Path, train: int, validation: int = 15, test: int = 9) -> Path:
    """Given splits (no carve-out), of sizes that leave ragged last batches."""
    testing.write_jsonl(root / "train.jsonl", testing.sentiment_examples(train, seed=11))
    testing.write_jsonl(root / "validation.jsonl", testing.sentiment_examples(validation, seed=12))
    testing.write_jsonl(root / "test.jsonl", testing.sentiment_examples(test, seed=13))
    return root


def exact_recipe(model: Path, data: Path, run_dir: Path, **sections) -> dict:
    files = {split: str(data / f"{split}.jsonl") for split in ("train", "validation", "test")}
    train = {"lr": 1e-3, "epochs": 1, "log_every_steps": 1, "eval_batch_size": 4, **sections.pop("train", {})}
    return testing.text_recipe(model, data, run_dir, "full", data={"files": files}, train=train, **sections)


def run(tmp_path: Path, name: str, recipe: dict, *args) -> Path:
    path = testing.write_recipe(tmp_path / f"{name}.yaml", recipe)
    testing.fresh_accelerate_state()  # runs of one test may differ in precision, as separate `finetune run`s would
    result = CliRunner().invoke(main, ["run", str(path), *map(str, args)])
    assert result.exit_code == 0, result.output
    return Path(recipe["output"]["dir"])


def run_processes(tmp_path: Path, name: str, recipe: dict, processes: int, *args, env: dict | None = None,
                  status: int = 0) -> Path:
    path = testing.write_recipe(tmp_path / f"{name}.yaml", recipe)
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(path), "--processes", str(processes), *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600,
    )
    assert done.returncode == status, done.stderr[-3000:]
    run_processes.stderr = done.stderr
    return Path(recipe["output"]["dir"])


SIGNALLING_TASK = '''
import os, signal, time
from finetune import stopping
from finetune.tasks.text_classification import TextClassification


class SignallingText(TextClassification):
    """Rank 0 sends SIGTERM to the launcher during training step SIGNAL_AT_STEP, twice as a scheduler and a job
    script may, and goes on once the launcher has passed it on: so the stop comes after that very step."""
    steps = 0

    def training_step(self, model, batch):
        SignallingText.steps += 1
        if os.environ.get("RANK") == "0" and SignallingText.steps == int(os.environ.get("SIGNAL_AT_STEP", "0")):
            for _ in range(2):  # within a second: one stop, not an abort
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(0.05)
            waited = time.monotonic()
            while not stopping.STOP.signal:
                assert time.monotonic() - waited < 60, "the launcher did not pass the signal on"
                time.sleep(0.01)
        return super().training_step(model, batch)
'''


@pytest.fixture
def signalling_task(tmp_path) -> dict:
    site = testing.write_distribution(tmp_path / "site", "signalling-task", "1.0",
                                      {"finetune.tasks": {"signalling-text": "signalling_task:SignallingText"}},
                                      {"signalling_task.py": SIGNALLING_TASK})
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_steplog(run_dir / "logs" / "steps.jsonl") if "loss" in r]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- accumulation -------------------------------------------------------------------------------
def test_accumulation_with_a_short_last_window_equals_the_larger_batch(tmp_path, exact_model):
    # 14 examples: batch 8 gives steps of 8 and 6; batch 4 × 2 gives windows (4, 4) and (4, 2). The
    # last window must weigh its micro-batches 4:2, as the batch of 6 does, not 1:1 (8e-3 off before).
    data = data_dir(tmp_path / "data", train=14)
    large = run(tmp_path, "large", exact_recipe(exact_model, data, tmp_path / "large", train={"batch_size": 8}))
    accumulated = run(tmp_path, "accumulated", exact_recipe(
        exact_model, data, tmp_path / "accumulated", train={"batch_size": 4, "grad_accum_steps": 2}))

    assert summary(large)["steps"] == summary(accumulated)["steps"] == 2
    assert max_difference(weights(large), weights(accumulated)) < 1e-5
    for a, b in zip(train_records(large), train_records(accumulated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the logged loss is the larger batch's loss
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert summary(large)["metrics"]["test"]["loss"] == pytest.approx(summary(accumulated)["metrics"]["test"]["loss"], rel=1e-5)


# -- learning rates -----------------------------------------------------------------------------
def closed_form(step: int, peak: float, warmup: int, total: int, scheduler: str) -> float:
    """The rate used by optimizer step `step` (1-based): warm-up from 0, then linear or cosine decay."""
    done = step - 1
    if done < warmup:
        return peak * done / warmup
    progress = (done - warmup) / (total - warmup)
    return peak * (max(0.0, 1 - progress) if scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_logged_learning_rates_follow_the_closed_form_with_accumulation(tmp_path, exact_model, scheduler):
    data = data_dir(tmp_path / "data", train=20)  # batch 4 × 2: windows of 8, 8, 4 per epoch
    run_dir = run(tmp_path, "lr", exact_recipe(exact_model, data, tmp_path / "run", train={
        "batch_size": 4, "grad_accum_steps": 2, "epochs": 3, "scheduler": scheduler, "warmup_steps": 2}))
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 10))
    for record in records:
        assert record["lr"] == pytest.approx(closed_form(record["step"], 1e-3, 2, 9, scheduler), abs=1e-12)


# -- resume -------------------------------------------------------------------------------------
rewind = testing.rewind_run


def test_resume_in_the_middle_of_epoch_two_is_bit_identical(tmp_path, distilbert_dir):
    # 20 examples, batch 4 × 2: 3 steps per epoch; the checkpoint of step 4 sits after one window of epoch 2.
    # Dropout is on: the random state must be restored too. Log lines span 3 steps, across a checkpoint.
    data = data_dir(tmp_path / "data", train=20)
    recipe = exact_recipe(distilbert_dir, data, tmp_path / "whole", train={
        "batch_size": 4, "grad_accum_steps": 2, "epochs": 3, "warmup_steps": 2, "log_every_steps": 3},
        eval={"every_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 5})
    whole = run(tmp_path, "whole", recipe)
    state = json.loads((whole / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 2)  # mid-epoch 2

    resumed = rewind(whole, tmp_path / "resumed", step=4)
    run(tmp_path, "whole", {**recipe, "output": {"dir": str(resumed)}}, "--resume")
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(whole)["metrics"] == summary(resumed)["metrics"]
    assert summary(whole)["history"] == summary(resumed)["history"]
    # The step log reads as one run, losses included (a line is written at every checkpoint).
    def timeless(run_dir):
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in read_steplog(run_dir / "logs" / "steps.jsonl")]

    assert timeless(whole) == timeless(resumed)
    # Training time is summed over sessions: the resumed run counts the first session's 4 steps too.
    assert summary(resumed)["train_seconds"] > 0.0 and state["train_seconds"] > 0.0


# -- several processes --------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch_and_resume_bit_identically(tmp_path, exact_model,
                                                                                          signalling_task):
    # 16 training examples: 2 × batch 4 covers the same 8 examples per step as 1 × batch 8. The eval
    # split of 15 and the test split of 9 leave a last batch that accelerate completes with repeated
    # examples on one process; they must not count.
    data = data_dir(tmp_path / "data", train=16)
    def recipe(run_dir: Path, batch_size: int) -> dict:
        return exact_recipe(exact_model, data, run_dir, train={"epochs": 2, "warmup_steps": 1, "batch_size": batch_size},
                            eval={"every_steps": 1, "metrics": ["accuracy", "f1"]})

    one = run(tmp_path, "one", recipe(tmp_path / "one", 8))
    two = run_processes(tmp_path, "two", recipe(tmp_path / "two", 4), 2)

    assert summary(two)["environment"]["processes"] == 2 and summary(one)["steps"] == summary(two)["steps"] == 4
    first, second = summary(two)["rank_checksums"]  # the ranks really trained as one (gradients synchronised)
    assert first == second
    assert "| batch size | 8 examples per optimizer step (4 per device × 1 accumulation × 2 processes) |" in (two / "README.md").read_text()
    assert max_difference(weights(one), weights(two)) < 1e-5
    for split in ("eval", "test"):
        a, b = summary(one)["metrics"][split], summary(two)["metrics"][split]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"] and a["f1"] == b["f1"]
    for a, b in zip(summary(one)["history"], summary(two)["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    predictions = [json.loads((d / "predictions.json").read_text()) for d in (one, two)]
    assert predictions[0] == predictions[1] and len(predictions[0]["eval"]["references"]) == 15
    for a, b in zip(train_records(one), train_records(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["lr"] == b["lr"] == pytest.approx(closed_form(a["step"], 1e-3, 1, 4, "linear"), abs=1e-12)

    # Preempted by SIGTERM during step 3 (mid-epoch 2), with no checkpoint planned before the end: both processes
    # stop after that step with one checkpoint, and the same command line requeued ends bit-identical.
    preempted = {**recipe(tmp_path / "resumed", 4), "checkpoint": {"every_steps": 100}}
    preempted["task"]["name"] = "signalling-text"  # text classification, sending the signal
    resumed = run_processes(tmp_path, "resumed", preempted, 2, "--resume", "auto",
                            env={**signalling_task, "SIGNAL_AT_STEP": "3"}, status=RESUMABLE)
    assert "Stopped on SIGTERM after step 3 of 4" in run_processes.stderr and "exitcode" not in run_processes.stderr
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000003"]
    assert not (resumed / "model").exists()
    run_processes(tmp_path, "resumed", preempted, 2, "--resume", "auto", env=signalling_task)
    a, b = weights(two), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(two)["metrics"] == summary(resumed)["metrics"]
    assert summary(two)["rank_checksums"] == summary(resumed)["rank_checksums"]


# -- early stopping -----------------------------------------------------------------------------
def expected_stop(history: list[dict], metric: str, patience: int) -> tuple[int, int]:
    """(step at which training stops, best step) for a lower-is-better metric, by the rule's definition."""
    best, best_step, bad = math.inf, None, 0
    for row in history:
        if row[metric] < best:
            best, best_step, bad = row[metric], row["step"], 0
        else:
            bad += 1
            if bad == patience:
                return row["step"], best_step
    return history[-1]["step"], best_step


def early_stopping_recipe(model: Path, data: Path, run_dir: Path, final_model: str) -> dict:
    # A constant, high learning rate on a small model: the eval loss falls, then rises.
    return exact_recipe(model, data, run_dir, train={"lr": 3e-2, "scheduler": "constant", "epochs": 8, "batch_size": 8},
                        eval={"every_steps": 2, "early_stopping": {"metric": "loss", "patience": 2, "final_model": final_model}},
                        checkpoint={"keep_last": 1})


def test_early_stopping_on_loss_stops_where_it_should_and_keeps_the_best_weights(tmp_path, exact_model):
    data = data_dir(tmp_path / "data", train=64, validation=7)
    run_dir = run(tmp_path, "best", early_stopping_recipe(exact_model, data, tmp_path / "best", "best"))
    result = summary(run_dir)
    history = result["history"]
    stop, best = expected_stop(history, "loss", patience=2)
    assert best != history[0]["step"] and best != stop  # the loss fell, then rose: the rule is really exercised
    assert result["stopped_early"] and result["steps"] == stop == history[-1]["step"]
    assert result["model_step"] == result["best_step"] == best

    # The best checkpoint survived rotation (keep_last 1) and the saved model holds exactly its weights.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{best:08d}", f"step-{stop:08d}"]
    saved, checkpoint = weights(run_dir), load_file(run_dir / "checkpoints" / f"step-{best:08d}" / "model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    # The eval results reported are those of the best evaluation, measured again on the restored weights.
    best_row = next(row for row in history if row["step"] == best)
    assert result["metrics"]["eval"] == pytest.approx({k: v for k, v in best_row.items() if k not in ("step", "epoch")})
    card = (run_dir / "README.md").read_text()
    assert f"Saved weights: step {best}, the best evaluation (eval loss {best_row['loss']:.4f}), not the last one (step {stop})" in card

    last_dir = run(tmp_path, "last", early_stopping_recipe(exact_model, data, tmp_path / "last", "last"))
    last = summary(last_dir)
    assert last["history"] == history and last["model_step"] == stop
    assert last["metrics"]["eval"]["loss"] == history[-1]["loss"]
    assert max_difference(weights(last_dir), saved) > 1e-3  # really other weights
    assert f"The saved model is the final state (step {stop}, eval loss" in (last_dir / "README.md").read_text()


# -- divergence ---------------------------------------------------------------------------------
def test_a_diverging_run_stops_cleanly_and_resumes_from_a_good_checkpoint_at_a_lower_rate(tmp_path, exact_model):
    data = data_dir(tmp_path / "data", train=32)
    # Warm-up from 0: step 1 changes nothing, step 2 (lr 5e5) wrecks the weights, then the loss is NaN.
    recipe = exact_recipe(exact_model, data, tmp_path / "run", train={"lr": 1e6, "warmup_steps": 2, "epochs": 2, "batch_size": 8},
                          checkpoint={"every_steps": 1, "keep_last": 10})
    path = testing.write_recipe(tmp_path / "diverge.yaml", recipe)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output[result.output.index("Error: "):]
    run_dir = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    last = int(checkpoints[-1].split("-")[1])
    # (How large the wrecked loss gets before it is NaN depends on the float summation order.)
    assert message.startswith("Error: Training diverged: the training loss is ") and " and the gradient norm nan " in message
    assert f"with the weights after step {last} of 8 (learning rate" in message
    assert "Try a lower train.lr (now 1e+06), keep gradient clipping on (train.max_grad_norm), or use bf16 instead of fp16" in message
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / checkpoints[-2]}" in message
    assert f"{run_dir / 'checkpoints' / checkpoints[-1]} holds the weights that gave this value: delete it first" in message
    # Nothing presents the run as trained; everything it had is still there.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "logs", "recipe.yaml"]
    # The check comes before the update: no checkpoint, the suspect one included, holds a non-finite weight.
    for name in checkpoints:
        saved = load_file(run_dir / "checkpoints" / name / "model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in saved.values())

    # Back to step 1 (whose update used lr 0), at a sane rate: the run finishes and says what happened.
    for name in checkpoints[1:]:
        shutil.rmtree(run_dir / "checkpoints" / name)
    resumed = CliRunner().invoke(main, ["run", str(path), "--resume", "--set", "train.lr=1e-3"])
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming from" in resumed.output and checkpoints[0] in resumed.output
    result = summary(run_dir)
    assert result["steps"] == 8 and math.isfinite(result["metrics"]["test"]["loss"])
    assert result["lr_changes"] == [{"step": 1, "from": 1e6, "to": 1e-3}]
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records[1:]:  # the schedule's shape, at the new peak
        assert record["lr"] == pytest.approx(closed_form(record["step"], 1e-3, 2, 8, "linear"), abs=1e-12)
    assert "| learning rate | 1e+06, 0.001 from step 2 (set on resume) |" in (run_dir / "README.md").read_text()


# -- mixed precision ----------------------------------------------------------------------------
def test_bf16_autocast_changes_the_numbers_but_not_the_result(tmp_path, exact_model):
    # If autocast were ignored, the bf16 run would be bit-identical to the fp32 one.
    data = data_dir(tmp_path / "data", train=16)
    fp32 = run(tmp_path, "fp32", exact_recipe(exact_model, data, tmp_path / "fp32", train={"batch_size": 8}))
    bf16 = run(tmp_path, "bf16", exact_recipe(exact_model, data, tmp_path / "bf16", train={"batch_size": 8, "mixed_precision": "bf16"}))
    difference = max_difference(weights(fp32), weights(bf16))
    assert 1e-6 < difference < 1e-2
    losses = [[r["loss"] for r in train_records(d)] for d in (fp32, bf16)]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], abs=2e-2)


# -- what the card reports about time ------------------------------------------------------------
def test_training_time_counts_steps_only_and_sums_over_sessions(tmp_path, exact_model, monkeypatch):
    """A fake clock: each training forward takes 1 s, each evaluation and checkpoint 100 s."""
    import finetune.training.loop as loop
    from finetune.tasks.text_classification import TextClassification

    clock = {"now": 0.0}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["now"]

    def taking(seconds, function):
        def timed(*args, **kwargs):
            clock["now"] += seconds
            return function(*args, **kwargs)
        return timed

    monkeypatch.setattr(loop, "time", FakeTime)
    monkeypatch.setattr(loop, "evaluate", taking(100, loop.evaluate))
    monkeypatch.setattr(loop, "save_checkpoint", taking(100, loop.save_checkpoint))
    monkeypatch.setattr(TextClassification, "training_step", taking(1, TextClassification.training_step))

    data = data_dir(tmp_path / "data", train=20)  # 5 micro-batches of 4 per epoch, 3 windows of 2
    recipe = exact_recipe(exact_model, data, tmp_path / "whole", train={"batch_size": 4, "grad_accum_steps": 2, "epochs": 2},
                          eval={"every_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 5})
    whole = run(tmp_path, "whole", recipe)
    assert summary(whole)["train_seconds"] == 10.0  # 10 forward passes; no evaluation, no checkpoint
    resumed = rewind(whole, tmp_path / "resumed", step=2)
    run(tmp_path, "resumed", {**recipe, "output": {"dir": str(resumed)}}, "--resume")
    assert summary(resumed)["train_seconds"] == 10.0  # 4 s before the checkpoint of step 2, 6 s after


@pytest.mark.slow
def test_a_metric_that_fails_on_the_main_process_stops_every_process(tmp_path, exact_model):
    # Metrics are computed on the main process only; its error must reach the other rank, which
    # would otherwise wait for the results forever. (top5_accuracy needs scores text classification lacks.)
    data = data_dir(tmp_path / "data", train=16)
    recipe = exact_recipe(exact_model, data, tmp_path / "run", train={"batch_size": 4, "max_steps": 1},
                          eval={"metrics": ["accuracy", "top5_accuracy"]})
    path = testing.write_recipe(tmp_path / "r.yaml", recipe)
    done = subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--processes", "2"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("eval.metrics: 'top5_accuracy' ranks classes by score") == 2  # raised on both ranks
    assert not (tmp_path / "run" / "model").exists()
