"""AdamW with decoupled weight decay, and the learning-rate schedule."""

from __future__ import annotations

import math

from finetune.recipe import TrainSection


def build_optimizer(groups: list[dict], train: TrainSection, model=None):
    """AdamW over the method's parameter groups (see Method.parameter_groups); no weight decay on
    biases, normalisation weights and what the model names in `no_weight_decay()` (decaying them
    only pulls useful offsets, scales and embeddings toward zero)."""
    import torch

    exempt = no_weight_decay(model) if model is not None else set()
    split = []
    for group in groups:
        lr = group.get("lr", train.lr)
        params = [p for p in group["params"] if p.requires_grad]
        # Biases and normalisation scales/offsets are exactly the 1-d parameters (timm's rule too).
        decayed = [p for p in params if p.ndim >= 2 and id(p) not in exempt]
        split.append({"params": decayed, "weight_decay": train.weight_decay, "lr": lr})
        split.append({"params": [p for p in params if p.ndim < 2 or id(p) in exempt], "weight_decay": 0.0, "lr": lr})
    return torch.optim.AdamW([g for g in split if g["params"]], lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)


def no_weight_decay(model) -> set[int]:
    """Ids of the parameters that a submodule names in `no_weight_decay()` (timm's convention: a ViT's
    pos_embed and cls_token), matched as timm's own param_groups_weight_decay does (names or wildcards)."""
    from fnmatch import fnmatch

    exempt = set()
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            patterns = list(names())
            exempt |= {id(p) for name, p in module.named_parameters() if any(fnmatch(name, x) for x in patterns)}
    return exempt


def build_scheduler(optimizer, train: TrainSection, total_steps: int, num_processes: int):
    """Warm-up then linear / cosine decay, or constant.

    accelerate steps a prepared scheduler once per process for every optimizer step, so the
    schedule is laid out in process-steps."""
    from transformers import get_scheduler

    warmup = train.warmup_steps if train.warmup_steps is not None else math.ceil(train.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup * num_processes, num_training_steps=total_steps * num_processes
    )
