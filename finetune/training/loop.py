"""The training loop: one flat loop for every task, on accelerate.

Read it top to bottom: build the data loaders and the optimizer, restore a checkpoint if
resuming, then step through epochs; log, evaluate, checkpoint and maybe stop early on the
schedule the recipe gives. The task supplies only `training_step`, `eval_step` and `collate`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from finetune.api import parameter_groups_of
from finetune.recipe import Recipe
from finetune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from finetune.training.optim import build_optimizer, build_scheduler
from finetune.errors import FinetuneError
from finetune.training.steplog import StepLog, truncate_steplog


def train(accelerator, model, task, method, splits, recipe: Recipe, metrics, checkpoints: Path, steplog: Path, resume: bool):
    """Train `model` in place; return (prepared model, final trainer state, the last evaluation or None)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    t, ev, ck = recipe.train, recipe.eval, recipe.checkpoint
    # Own generators keep data order out of the global RNG, so resuming mid-epoch replays the same dropout.
    train_dl = DataLoader(
        splits["train"], batch_size=t.batch_size, shuffle=True, collate_fn=task.collate,
        generator=torch.Generator().manual_seed(t.seed), num_workers=t.dataloader_workers,
    )
    train_dl, eval_dl = accelerator.prepare(train_dl, eval_loader(splits["eval"], recipe, task))

    steps_per_epoch = math.ceil(len(train_dl) / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(parameter_groups_of(method, model), t)
    scheduler = build_scheduler(optimizer, t, total_steps, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best": None, "bad_evals": 0, "history": [], "stopped_early": False}
    if resume:
        checkpoint = latest_checkpoint(checkpoints)
        state = load_checkpoint(accelerator, checkpoint)
        if accelerator.is_main_process:
            truncate_steplog(steplog, state["step"])
        accelerator.print(f"Resuming from {checkpoint} (step {state['step']} of {total_steps})")

    log = StepLog(steplog, accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=state["step"], desc="Training", unit="step", disable=not accelerator.is_main_process)
    window = _Window()
    last_eval = None  # the loop always evaluates its final state; the caller reuses that
    model.train()
    done = state["step"] >= total_steps or state["stopped_early"]
    for epoch in range(state["epoch"], epochs):
        if done:
            break
        train_dl.set_epoch(epoch)  # the seedable sampler reshuffles per epoch, identically on every rank
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        state["epoch"], state["batches_in_epoch"] = epoch, skip
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.training_step(model, batch)["loss"]
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and t.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            window.add(loss, _batch_size(batch) * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue  # still accumulating

            state["step"] += 1
            step = state["step"]
            bar.update(1)
            end_of_epoch = state["batches_in_epoch"] >= len(train_dl)
            if step % t.log_every_steps == 0 or step == total_steps:
                record = window.flush(accelerator, step, epoch + state["batches_in_epoch"] / len(train_dl))
                record["lr"] = scheduler.get_last_lr()[0]
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{record['examples_per_s']:.0f}")

            evaluated = (ev.every_steps and step % ev.every_steps == 0) or (not ev.every_steps and end_of_epoch) or step == total_steps
            if evaluated:
                last_eval = evaluate(accelerator, model, task, eval_dl, metrics)
                results = last_eval["metrics"]
                state["history"].append({"step": step, "epoch": epoch + 1 if end_of_epoch else epoch, **results})
                log.write({"step": step, "eval": results})
                if accelerator.is_main_process:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
                _update_early_stopping(state, results, ev.early_stopping)

            if (ck.every_steps and step % ck.every_steps == 0) or (not ck.every_steps and evaluated):
                position = {"epoch": epoch + 1, "batches_in_epoch": 0} if end_of_epoch else {}
                save_checkpoint(accelerator, checkpoints, step, {**state, **position}, ck.keep_last)

            if step >= total_steps or state["stopped_early"]:
                done = True
                break
    bar.close()
    log.close()
    if last_eval is None:  # resumed after the last step: nothing was trained, evaluate once
        last_eval = evaluate(accelerator, model, task, eval_dl, metrics)
    return model, state, last_eval


def eval_loader(dataset, recipe: Recipe, task):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset, batch_size=recipe.train.eval_batch_size, collate_fn=task.collate, num_workers=recipe.train.dataloader_workers
    )


def evaluate(accelerator, model, task, dataloader, metrics) -> dict:
    """Mean loss and metrics over `dataloader`, gathered from every process; also the predictions."""
    import torch

    model.eval()
    loss_sum, examples = 0.0, 0
    gathered: dict[str, list] = {"predictions": [], "references": [], "scores": []}
    with torch.no_grad():
        for batch in dataloader:
            out = task.eval_step(model, batch)
            size = torch.tensor([_batch_size(batch)], device=accelerator.device)
            weighted = accelerator.gather(out["loss"].detach().float().reshape(1) * size)
            loss_sum += float(weighted.sum())
            examples += int(accelerator.gather(size).sum())
            for key in [k for k in gathered if k in out]:
                if hasattr(out[key], "tolist"):  # a tensor, one row per example
                    gathered[key] += accelerator.gather_for_metrics(out[key]).tolist()
                else:  # a list per example of any length (a sentence's tags): gathered as objects
                    gathered[key] += accelerator.gather_for_metrics(list(out[key]), use_gather_object=True)
    model.train()
    results = {"loss": loss_sum / examples}  # mean over examples, not over batches of unequal size
    if gathered["predictions"]:
        results.update(metrics.compute(gathered["predictions"], gathered["references"], gathered["scores"] or None))
    return {"metrics": results, "predictions": gathered["predictions"], "references": gathered["references"]}


def _update_early_stopping(state: dict, results: dict, rule) -> None:
    if rule is None:
        return
    if rule.metric not in results:
        raise FinetuneError(f"eval.early_stopping.metric: '{rule.metric}' is not among the results {sorted(results)}.")
    value, best = results[rule.metric], state["best"]
    better = best is None or (value > best + rule.min_delta if rule.mode == "max" else value < best - rule.min_delta)
    if better:
        state["best"], state["bad_evals"] = value, 0
    else:
        state["bad_evals"] += 1
        state["stopped_early"] = state["bad_evals"] >= rule.patience


def _batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))


class _Window:
    """Loss and throughput since the last log line."""

    def __init__(self):
        self.start, self.loss, self.batches, self.examples = time.perf_counter(), 0.0, 0, 0

    def add(self, loss, examples: int) -> None:
        self.loss += loss.detach().float()
        self.batches += 1
        self.examples += examples

    def flush(self, accelerator, step: int, epoch: float) -> dict:
        mean_loss = accelerator.reduce(self.loss / self.batches, reduction="mean")
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "epoch": round(epoch, 4), "loss": float(mean_loss), "examples_per_s": self.examples / elapsed}
        self.__init__()
        return record
