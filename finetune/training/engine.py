"""The engine a run trains on: one accelerate `Accelerator`, configured from the recipe.

Devices, processes and mixed precision are accelerate's business; this module only turns the
recipe into its arguments and accelerate's refusals into messages that name the recipe key.
"""

from __future__ import annotations

import os

from finetune.errors import FinetuneError
from finetune.recipe import Recipe


def make_accelerator(recipe: Recipe):
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1"
    precision = recipe.train.mixed_precision
    if precision == "fp16" and cpu:
        # accelerate would accept it and quietly train in fp32 (no autocast, no gradient scaler).
        raise FinetuneError(
            "train.mixed_precision: 'fp16' needs a CUDA GPU, and none is in use here; "
            "set train.mixed_precision to bf16 (autocast on the CPU too) or no."
        )
    try:
        # Accumulation is done by the training loop (exact on a short last window), not by accelerate.
        accelerator = Accelerator(
            mixed_precision=precision,
            cpu=cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        )
    except (ValueError, RuntimeError) as exc:
        if "already been initialized" in str(exc):
            # accelerate fixes device and precision once per Python process.
            raise FinetuneError(
                f"train.mixed_precision: this Python process already trained with other accelerate settings, and "
                f"accelerate cannot switch to '{precision}' within one process. Run each recipe in its own process "
                "(`finetune run`), or restart the notebook's kernel between recipes of different precision."
            ) from None
        raise FinetuneError(
            f"accelerate could not start ({type(exc).__name__}: {exc}); the recipe asks for train.mixed_precision "
            f"'{precision}' on the {'CPU' if cpu else 'GPU'}. Fix what accelerate names, or set train.mixed_precision: no."
        ) from None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its engine steps inside backward at every micro-batch unless told the window; not wired up yet.
        raise FinetuneError(
            "DeepSpeed is not supported by finetune's training loop yet; launch with DDP (finetune run --processes N, "
            "torchrun, or an accelerate config without deepspeed_config)."
        )
    return accelerator


def count_parameters(model) -> dict:
    """Trainable and total parameters, and how many of each side are stored in which dtype."""
    from finetune.training.precision import parameter_dtypes

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "dtypes": parameter_dtypes(model)}


def rank_checksums(accelerator, model) -> list[float]:
    """A checksum of every parameter on each rank: equal when gradients were really synchronised."""
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    return accelerator.gather(checksum.to(accelerator.device)).tolist()
