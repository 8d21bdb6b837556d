"""AdamW with decoupled weight decay, and the learning-rate schedule."""

from __future__ import annotations

import math

from finetune.recipe import TrainSection


def build_optimizer(model, train: TrainSection):
    """AdamW over the trainable parameters; no weight decay on biases and normalisation weights
    (decaying them only pulls useful offsets and scales toward zero)."""
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Biases and normalisation scales/offsets are exactly the 1-d parameters.
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)


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
