"""AdamW with decoupled weight decay, and the learning-rate schedule."""

from __future__ import annotations

import math

from finetune.recipe import TrainSection


def build_optimizer(groups: list[dict], train: TrainSection, model=None):
    """AdamW over the method's parameter groups (see Method.parameter_groups), each split again by timm's
    weight-decay rule (`decay_exempt`): decaying biases, normalisation scales and embeddings such as a
    ViT's position embedding only pulls useful offsets, scales and positions toward zero."""
    import torch

    exempt = decay_exempt(model) if model is not None else set()
    split = []
    for group in groups:
        lr = group.get("lr", train.lr)
        params = [p for p in group["params"] if p.requires_grad]
        split.append({"params": [p for p in params if id(p) not in exempt], "weight_decay": train.weight_decay, "lr": lr})
        split.append({"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0, "lr": lr})
    return torch.optim.AdamW([g for g in split if g["params"]], lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)


def decay_exempt(model) -> set[int]:
    """Ids of the parameters timm's `param_groups_weight_decay` exempts from weight decay: 1-d parameters
    and biases, and what a (sub)module names in `no_weight_decay()`, timm's convention (a ViT's pos_embed
    and cls_token), matched against names inside that module, which a peft wrapper does not change."""
    from timm.optim import param_groups_weight_decay

    def no_decay(module, names=()) -> set[int]:
        groups = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=names)
        return {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}

    exempt = no_decay(model)
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            exempt |= no_decay(module, set(names()))
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
