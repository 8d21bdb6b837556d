"""The training loop: one flat loop for every task, on accelerate.

Read it top to bottom: `Trainer.__init__` builds the data loaders, the optimizer and the schedule;
`restore` resumes from a checkpoint; `run` steps through the epochs one optimizer update at a
time (`_update`: one accumulation window), and after each update logs, evaluates, checkpoints
and maybe stops, on the schedule the recipe gives. The task supplies `training_step`,
`eval_step`, `collate`, and optionally `count_items`.

Every loss is weighted by its items (examples, or labelled tokens) over the whole window on
every process, so batch b × accumulation k trains exactly as one batch of b·k would, also on an
epoch's short last window (transformers' `num_items_in_batch` fix), and N processes as one
batch N times larger. (Under N processes accelerate completes an epoch's last batch with examples
from its start, `even_batches`: those are trained twice, as in any accelerate or Trainer run.)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.api import batch_examples
from finetune.errors import FinetuneError, TrainingDiverged
from finetune.recipe import Recipe
from finetune.stopping import STOP, Preempted, ignore_in_loader_workers, requested_everywhere
from finetune.storage import expected_bytes, writing
from finetune.training.augmentation import SeededExamples
from finetune.training.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from finetune.training.eval_loop import Evaluation, eval_loader, evaluate
from finetune.training.optim import build_optimizer, build_scheduler
from finetune.training.state import TrainerState
from finetune.training.steplog import StepLog, truncate_steplog
from finetune.training.trainable_state import TrainableState, shared_fingerprint


@dataclass
class TrainResult:
    model: Any
    """The prepared (accelerate-wrapped) model, holding the weights the run saves."""
    state: TrainerState
    evaluation: Evaluation
    """The eval split's evaluation of those weights."""
    model_step: int
    """The step whose weights they are: the last, or the best evaluation's (eval.early_stopping.final_model)."""


def train(accelerator, model, task, method, frozen: list, splits, recipe: Recipe, metrics, checkpoints: Path, steplog: Path,
          resume: bool, tracking=None) -> TrainResult:
    """Train `model` in place on splits["train"], evaluating on splits["eval"]; the `frozen` modules
    stay in eval mode throughout. `tracking` (finetune.tracking) receives every step-log record."""
    trainer = Trainer(accelerator, model, task, method, frozen, splits, recipe, metrics, checkpoints, steplog, tracking)
    if resume:
        trainer.restore()
    return trainer.run()


@dataclass
class _Update:
    loss_sum: Any  # Σ loss × items over the window, every process
    items: Any
    examples: int
    lr: float
    grad_norm: float | None


class Trainer:
    def __init__(self, accelerator, model, task, method, frozen: list, splits, recipe: Recipe, metrics, checkpoints: Path,
                 steplog: Path, tracking=None):
        import torch
        from torch.utils.data import DataLoader

        self.accelerator, self.task, self.recipe, self.metrics = accelerator, task, recipe, metrics
        self.frozen = frozen
        self.checkpoints, self.steplog, self.tracking = checkpoints, steplog, tracking
        t = recipe.train
        # Own generators keep data order out of the global RNG, so resuming mid-epoch replays the same dropout.
        self.train_examples = SeededExamples(splits["train"], t.seed)
        train_dl = DataLoader(
            self.train_examples, batch_size=t.batch_size, shuffle=True, collate_fn=task.collate,
            generator=torch.Generator().manual_seed(t.seed), num_workers=t.dataloader_workers,
            worker_init_fn=ignore_in_loader_workers if t.dataloader_workers else None,
        )
        self.train_dl, self.eval_dl = accelerator.prepare(train_dl, eval_loader(splits["eval"], recipe, task))
        self.steps_per_epoch = math.ceil(len(self.train_dl) / t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = build_optimizer(method.parameter_groups(model), t, model)
        scheduler = build_scheduler(optimizer, t, self.total_steps, accelerator.num_processes)
        fingerprint = shared_fingerprint(accelerator, model)  # of the frozen base, before any engine shards it
        self.checkpoint_bytes = expected_bytes(model, adapter=True, merged=False)["checkpoint"]
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.trainable = TrainableState(accelerator, self.model, fingerprint)
        self.deepspeed = accelerator.distributed_type == "DEEPSPEED"
        # The window's losses are scaled here already: DeepSpeed must not divide them by its accumulation steps too.
        self.backward_options = {"scale_wrt_gas": False} if self.deepspeed else {}
        self.state = TrainerState(lr=t.lr)
        self.checkpointed_step: int | None = None  # the step of the latest checkpoint this session wrote or read
        stop = recipe.eval.early_stopping
        self.stopping = stop
        self.keep_best = stop is not None and stop.final_model == "best"

    # -- resume ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from the latest complete checkpoint; a changed train.lr applies from here on."""
        checkpoint = latest_checkpoint(self.checkpoints)
        fresh_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]  # this recipe's peak rates
        self.state = load_checkpoint(self.accelerator, checkpoint, self.trainable)
        self.checkpointed_step = self.state.step
        restored = [group["initial_lr"] for group in self.optimizer.param_groups]
        if self.state.lr is None:  # a checkpoint from before the rate was recorded
            self.state.lr = restored[0]
        if restored != fresh_lrs and self.state.step < self.total_steps:
            self._rescale_lr(fresh_lrs)
        if self.accelerator.is_main_process:
            truncate_steplog(self.steplog, self.state.step)
        self.accelerator.print(f"Resuming from {checkpoint} (step {self.state.step} of {self.total_steps})")

    def _rescale_lr(self, fresh_lrs: list[float]) -> None:
        """The checkpoint restored the old peak rates; keep the schedule's shape, at the new peak."""
        schedule = self.scheduler.scheduler  # the LambdaLR under accelerate's wrapper
        for i, (group, peak) in enumerate(zip(self.optimizer.param_groups, fresh_lrs)):
            group["lr"] *= peak / group["initial_lr"]
            group["initial_lr"] = schedule.base_lrs[i] = peak
        self.state.lr_changes.append({"step": self.state.step, "from": self.state.lr, "to": self.recipe.train.lr})
        self.state.lr = self.recipe.train.lr

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        state, acc, t, ev, ck = self.state, self.accelerator, self.recipe.train, self.recipe.eval, self.recipe.checkpoint
        self.log = StepLog(self.steplog, acc.is_main_process, self.tracking)
        self.bar = tqdm(total=self.total_steps, initial=state.step, desc="Training", unit="step", disable=not acc.is_main_process)
        self.window = window = _LogWindow()
        last_eval = None  # the loop always evaluates its final state; the caller reuses that
        self._train_mode()
        STOP.training = True  # a signal from here on stops after a step, with a checkpoint (before: at once)
        self._stop_if_signalled()
        for epoch in range(state.epoch, self.epochs):
            if self._finished():
                break
            self.train_dl.set_epoch(epoch)  # the seedable sampler reshuffles per epoch, identically on every rank
            self.train_examples.epoch = epoch  # and the augmentation draws anew
            skip = state.batches_in_epoch
            batches = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
            for micro_batches in _windows(batches, t.grad_accum_steps):
                started = time.perf_counter()
                with self._out_of_memory("training"):
                    update = self._update(micro_batches)
                seconds = time.perf_counter() - started
                state.train_seconds += seconds
                window.add(update, seconds)
                state.batches_in_epoch += len(micro_batches)
                progress = epoch + state.batches_in_epoch / len(self.train_dl)
                if state.batches_in_epoch >= len(self.train_dl):
                    state.epoch, state.batches_in_epoch = epoch + 1, 0
                self.bar.update(1)

                step = state.step
                window.progress = progress
                if step % t.log_every_steps == 0 or step == self.total_steps:
                    self._log(window.flush(step))
                end_of_epoch = state.batches_in_epoch == 0
                evaluated = (ev.every_steps and step % ev.every_steps == 0) or (not ev.every_steps and end_of_epoch) \
                    or step == self.total_steps
                improved = False
                if evaluated:
                    last_eval, improved = self._evaluate(progress)
                if (ck.every_steps and step % ck.every_steps == 0) or (not ck.every_steps and evaluated) \
                        or (improved and self.keep_best):
                    self._checkpoint()
                self._stop_if_signalled()
                if self._finished():
                    break
        self._flush_log()  # an early stop between log steps
        self.bar.close()
        self.log.close()
        if last_eval is None:  # resumed after the last step: nothing was trained, evaluate once
            with self._out_of_memory("evaluation"):
                last_eval = evaluate(acc, self.model, self.task, self.eval_dl, self.metrics)
        return self._final(last_eval)

    def _checkpoint(self) -> None:
        self._flush_log()  # a log line never spans a checkpoint: a resumed run logs the same lines
        last = latest_checkpoint(self.checkpoints)
        needed = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) if last else self.checkpoint_bytes
        where = checkpoint_dir(self.checkpoints, self.state.step)
        with writing(f"the checkpoint {where.name}", where, needed=needed, checkpoints=self.checkpoints):
            save_checkpoint(self.accelerator, self.checkpoints, self.state, self.trainable, self.recipe.checkpoint.keep_last,
                            self.state.best_step if self.keep_best else None)
        self.checkpointed_step = self.state.step

    def _stop_if_signalled(self) -> None:
        """After a preemption signal reached any process: every process stops here, after a checkpoint of the
        current step (finetune.stopping)."""
        signum = requested_everywhere(self.accelerator)
        if not signum:
            return
        import signal

        step, total = self.state.step, self.total_steps
        if step and self.checkpointed_step != step:
            self._checkpoint()
        STOP.saved = True
        self._flush_log()
        self.bar.close()
        self.log.close()
        if step:
            where = f"Everything trained so far is in {checkpoint_dir(self.checkpoints, step)}."
        else:
            where = "Nothing was trained yet, so there is no checkpoint: the same command starts afresh."
        raise Preempted(
            f"Stopped on {signal.Signals(signum).name} after step {step} of {total}. {where} Continue with the same "
            "command and `--resume auto` (it resumes when a checkpoint exists and starts afresh otherwise)."
        )

    def _train_mode(self) -> None:
        train_mode(self.model, self.frozen)

    def _flush_log(self) -> None:
        if self.window.updates:
            self._log(self.window.flush(self.state.step))

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    # -- one optimizer update -------------------------------------------------------------
    def _update(self, micro_batches: list[dict]) -> _Update:
        """Forward and backward every micro-batch of the window, then one optimizer step.

        Each micro-batch's mean loss is turned into its share of the window's mean: × its items /
        the items of the whole window on all processes, × the number of processes because DDP
        averages the gradients it sums. (accelerator.backward divides by its gradient_accumulation_steps,
        which stays 1: the window is accumulated here, so that a short last window is exact.)"""
        import torch

        acc = self.accelerator
        items = [self.task.count_items(batch).to(acc.device).float().sum() for batch in micro_batches]
        total = acc.reduce(torch.stack(items).sum(), reduction="sum")
        scale = acc.num_processes / total.clamp(min=1)
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            acc.sync_gradients = last  # DeepSpeed's engine steps at a backward with sync_gradients, once per window
            with contextlib.nullcontext() if last else acc.no_sync(self.model):  # gradients sync once per window
                loss = self.task.training_step(self.model, batch)["loss"]
                # A micro-batch without items (every token ignored) has a NaN mean: it counts for nothing.
                loss = torch.where(items[i] > 0, loss, torch.zeros_like(loss))
                acc.backward(loss * items[i] * scale, **self.backward_options)
            loss_sum += loss.detach().float() * items[i]
        max_norm = self.recipe.train.max_grad_norm or math.inf  # inf: measured, not clipped
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)  # None: an engine that does not report it
        grad_norm = None if grad_norm is None else float(grad_norm)
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        self._check_finite(float(loss_sum / total.clamp(min=1)), grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        self.optimizer.step()
        self.scheduler.step()  # accelerate does not step it when the fp16 scaler skipped the update
        self.optimizer.zero_grad()
        if self.optimizer.step_was_skipped:
            self.state.skipped_steps += 1
        self.state.step += 1
        examples = sum(batch_examples(b) for b in micro_batches) * acc.num_processes
        return _Update(loss_sum, total, examples, lr, grad_norm)

    def _check_finite(self, loss: float, grad_norm: float | None) -> None:
        """Stop before a non-finite update reaches the weights. Loss and norm are the same on every
        rank (reduced, and taken after gradient synchronisation), so every rank stops together. Under
        fp16 an infinite gradient is the scaler's business: it skips that update and lowers its scale (under
        DeepSpeed the engine has applied the update inside the last backward already, or skipped it)."""
        # fp16 loss scaling: accelerate's scaler, or DeepSpeed's own (it skips an overflowing step itself).
        scaled = self.accelerator.scaler is not None or (self.deepspeed and self.recipe.train.mixed_precision == "fp16")
        if not (math.isfinite(loss) and (scaled or grad_norm is None or math.isfinite(grad_norm))):
            self._diverged(f"the training loss is {loss} and the gradient norm {grad_norm}")

    def _diverged(self, what: str):
        """Raise TrainingDiverged: what went wrong, what to try, and which checkpoint to resume from.

        The weights of step N are the ones that gave the non-finite value; a checkpoint of step N
        holds them, so the advice points before it."""
        step, lr = self.state.step, self.optimizer.param_groups[0]["lr"]
        suspect = checkpoint_dir(self.checkpoints, step)
        good = [c for c in list_checkpoints(self.checkpoints) if c != suspect]
        if good:
            where = (f"The last good checkpoint is {good[-1]}: `finetune run RECIPE --resume --set train.lr=...` "
                     "continues from it at a lower learning rate.")
            if suspect.is_dir():
                where += f" {suspect} holds the weights that gave this value: delete it first, or --resume takes it."
        else:
            where = "No good checkpoint was written before it: start over with a change and --overwrite."
        raise TrainingDiverged(
            f"Training diverged: {what} with the weights after step {step} of {self.total_steps} (learning rate {lr:.3g}). No final "
            f"model or card was written; the run directory is otherwise as it was. Try a lower train.lr (now "
            f"{self.recipe.train.lr:g}), keep gradient clipping on (train.max_grad_norm), or use bf16 instead of fp16. {where}"
        )

    @contextlib.contextmanager
    def _out_of_memory(self, phase: str):
        """Turn the device running out of memory into one message: where, with which batch, what to try."""
        import torch

        try:
            yield
        except torch.OutOfMemoryError:
            raise FinetuneError(self._memory_advice(phase)) from None

    def _memory_advice(self, phase: str) -> str:
        r, t = self.recipe, self.recipe.train
        where = f"step {self.state.step + 1} of {self.total_steps}" if phase == "training" else f"the evaluation after step {self.state.step}"
        if phase == "training":
            batch = f"train.batch_size {t.batch_size} × train.grad_accum_steps {t.grad_accum_steps} per device"
            tries = [f"a smaller train.batch_size with more train.grad_accum_steps, the same examples per step (e.g. "
                     f"batch_size: {max(t.batch_size // 2, 1)}, grad_accum_steps: {t.grad_accum_steps * 2})"]
            if not t.gradient_checkpointing:
                tries.append("train.gradient_checkpointing: true")
        else:
            batch = f"train.eval_batch_size {t.eval_batch_size}"
            tries = [f"a smaller train.eval_batch_size (e.g. {max(t.eval_batch_size // 2, 1)})"]
        if t.mixed_precision == "no":
            tries.append("train.mixed_precision: bf16")
        if r.model.dtype == "float32" and r.method.name != "full":
            tries.append("model.dtype: bfloat16 for the frozen weights")
        if r.method.name == "full":
            tries.append("method lora, which trains a small adapter and keeps no optimizer state for the base")
        last = latest_checkpoint(self.checkpoints)
        resume = (f"The last complete checkpoint is {last}: after a change that keeps the recipe (only train.lr may "
                  "differ on --resume), continue from it; otherwise start over with --overwrite." if last else
                  "No checkpoint was written yet.")
        return (f"Out of memory on {self.accelerator.device} during {where} ({batch}). Try " + "; or ".join(tries)
                + f". {resume}")

    # -- logging, evaluation, early stopping ----------------------------------------------
    def _log(self, record: dict) -> None:
        self.log.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{record['examples_per_s']:.0f}")

    def _evaluate(self, progress: float) -> tuple[Evaluation, bool]:
        """Evaluate the current weights, record them, and say whether they are the best so far."""
        with self._out_of_memory("evaluation"):
            evaluation = evaluate(self.accelerator, self.model, self.task, self.eval_dl, self.metrics)
        self._train_mode()
        results, step = evaluation.metrics, self.state.step
        if not math.isfinite(results["loss"]):
            self._diverged(f"the eval loss is {results['loss']}")
        self.state.history.append({"step": step, "epoch": round(progress, 4), **results})
        self.log.write({"step": step, "eval": results})
        if self.accelerator.is_main_process:
            self.bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in results.items()))
        return evaluation, self._update_early_stopping(results)

    def _update_early_stopping(self, results: dict) -> bool:
        rule, state = self.stopping, self.state
        if rule is None:
            return False
        if rule.metric not in results:
            raise FinetuneError(f"eval.early_stopping.metric: '{rule.metric}' is not among the results {sorted(results)}.")
        value, best = results[rule.metric], state.best
        if rule.minimise:
            better = best is None or value < best - rule.min_delta
        else:
            better = best is None or value > best + rule.min_delta
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
        else:
            state.bad_evals += 1
            state.stopped_early = state.bad_evals >= rule.patience
        return better

    def _final(self, last_eval: Evaluation) -> TrainResult:
        """The weights the run keeps: the last step's, or the best evaluation's, restored from its checkpoint."""
        state = self.state
        if not self.keep_best or state.best_step in (None, state.step):
            return TrainResult(self.model, state, last_eval, state.step)
        best = checkpoint_dir(self.checkpoints, state.best_step)
        self.accelerator.print(f"Restoring the best evaluation's weights from {best}")
        load_checkpoint(self.accelerator, best, self.trainable)  # this run's own state (steps, history) stays as it is
        evaluation = evaluate(self.accelerator, self.model, self.task, self.eval_dl, self.metrics)
        return TrainResult(self.model, state, evaluation, state.best_step)


def train_mode(model, frozen: list) -> None:
    """Training mode, but for the `frozen` modules: their dropout stays off and their statistics fixed."""
    model.train()
    for module in frozen:
        module.eval()


def _windows(batches, size: int):
    """Micro-batches grouped by optimizer update; an epoch's last window may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class _LogWindow:
    """Loss and throughput of the updates since the last log line (training time only)."""

    def __init__(self):
        self.loss_sum, self.items, self.examples, self.seconds, self.updates = 0.0, 0.0, 0, 0.0, 0
        self.last: _Update | None = None
        self.progress = 0.0  # epochs done, as a fraction

    def add(self, update: _Update, seconds: float) -> None:
        self.loss_sum += float(update.loss_sum)
        self.items += float(update.items)
        self.examples += update.examples
        self.seconds += seconds
        self.updates += 1
        self.last = update

    def flush(self, step: int) -> dict:
        grad_norm = self.last.grad_norm
        record = {"step": step, "epoch": round(self.progress, 4), "loss": self.loss_sum / max(self.items, 1.0),
                  "lr": self.last.lr, "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                  "examples_per_s": self.examples / max(self.seconds, 1e-9)}
        progress = self.progress
        self.__init__()
        self.progress = progress
        return record
