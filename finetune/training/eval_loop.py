"""One pass over an evaluation split: loss, predictions and metrics, exact under several processes.

accelerate gives every process the same number of batches by repeating examples from the start
on the last one; `gather_for_metrics` drops those repeats. Losses are therefore gathered per
example (never as batch means, whose repeats cannot be taken out) and weighted by their items,
so N processes report what one process reports on the same weights. Metrics are computed once,
on the main process, and sent to the others: every rank sees the same numbers and so makes the
same early-stopping decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.errors import FinetuneError


@dataclass
class Evaluation:
    metrics: dict
    predictions: list = field(default_factory=list)
    references: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    """Per example, in the predictions' order: [loss × items, items] (on the main process): the loss is their sums' ratio."""


def eval_loader(dataset, recipe, task):
    from torch.utils.data import DataLoader

    from finetune.stopping import ignore_in_loader_workers

    workers = recipe.train.dataloader_workers
    return DataLoader(dataset, batch_size=recipe.train.eval_batch_size, collate_fn=task.collate, num_workers=workers,
                      worker_init_fn=ignore_in_loader_workers if workers else None)


def evaluate(accelerator, model, task, dataloader, metrics) -> Evaluation:
    """Items-weighted mean loss and metrics over `dataloader`, with every process's predictions (on the main
    process; the others keep none). The model is left in eval mode (the training loop puts it back into
    training mode its own way)."""
    import torch
    from accelerate.utils import broadcast_object_list

    model.eval()
    top_k, classes = metrics.score_top_k, 0
    weighted_losses = []  # per example: (loss × items, items), gathered, on the device
    gathered: dict[str, list] = {"predictions": [], "references": [], "scores": [], "score_classes": []}
    with torch.no_grad():
        for batch in dataloader:
            out = task.eval_step(model, batch)
            items = task.count_items(batch).to(accelerator.device).float()
            loss = _per_example(out["loss"], len(items)).float()
            pairs = torch.stack([torch.where(items > 0, loss * items, 0.0), items], dim=1)
            weighted_losses.append(accelerator.gather_for_metrics(pairs))
            if "scores" in out and top_k is not None and out["scores"].shape[-1] > top_k:
                # Only the highest scores travel: what the ranking metrics read, not one per class.
                classes = out["scores"].shape[-1]
                out["scores"], out["score_classes"] = out["scores"].topk(top_k, dim=-1)
            for key in [k for k in gathered if k in out]:
                if hasattr(out[key], "tolist"):  # a tensor, one row per example; kept on the device until the end
                    gathered[key].append(accelerator.gather_for_metrics(out[key]))
                else:  # a list per example of any length (a sentence's tags): gathered as objects
                    gathered[key] += accelerator.gather_for_metrics(list(out[key]), use_gather_object=True)

    results, losses = [None], []
    if accelerator.is_main_process:
        try:
            gathered = _as_lists(gathered, classes)
            losses = torch.cat(weighted_losses).double()
            results[0] = _compute(losses.sum(dim=0), gathered, metrics)
            losses = losses.tolist()
        except Exception as exc:  # sent to the other ranks too: they must not wait for results that never come
            results[0] = exc
    if accelerator.num_processes > 1:
        broadcast_object_list(results)
    if isinstance(results[0], BaseException):
        raise results[0]
    if not accelerator.is_main_process:
        return Evaluation(results[0])
    return Evaluation(results[0], gathered["predictions"], gathered["references"], losses)


def _as_lists(gathered: dict, classes: int) -> dict:
    """Python lists of the gathered tensors, built once, on the main process; top-k scores become a
    score matrix of `classes` columns again, every class outside an example's top k scoring below all of them."""
    import torch

    for key, values in gathered.items():
        if values and hasattr(values[0], "tolist"):
            gathered[key] = torch.cat(values)
    top_classes = gathered.pop("score_classes")
    if len(top_classes):
        top = gathered["scores"].float().cpu()
        dense = torch.full((len(top), classes), float(top.min()) - 1.0)
        gathered["scores"] = dense.scatter_(1, top_classes.long().cpu(), top)
    return {key: value.tolist() if hasattr(value, "tolist") else value for key, value in gathered.items()}


def _compute(total, gathered: dict, metrics) -> dict:
    if total[1] == 0:
        raise FinetuneError(
            "The evaluation split has nothing to score: every example's count_items is 0 (a token-level task whose "
            "labels were all cut by max_length or ignored?). Raise the task's max_length or check the labels."
        )
    results = {"loss": float(total[0] / total[1])}
    if gathered["predictions"]:
        results.update(metrics.compute(gathered["predictions"], gathered["references"], gathered["scores"] or None))
    return results


def _per_example(loss, examples: int):
    if loss.dim() == 1 and loss.numel() == examples:
        return loss.detach()
    raise FinetuneError(
        f"eval_step returned a loss of shape {tuple(loss.shape)} for a batch of {examples} examples; it must return "
        "one loss per example (e.g. F.cross_entropy(logits, labels, reduction='none')), so that evaluation under "
        "several processes can drop the examples repeated to fill the last batch."
    )
