"""The engine a run trains on: one accelerate `Accelerator`, configured from the recipe.

Devices, processes and mixed precision are accelerate's business; this module only turns the
recipe into its arguments and accelerate's refusals into messages that name the recipe key.
"""

from __future__ import annotations

import os
from datetime import timedelta

from finetune.errors import FinetuneError
from finetune.recipe import Recipe


def make_accelerator(recipe: Recipe):
    """The Accelerator for `recipe`. accelerate picks the device (CUDA, MPS, XPU, NPU or the CPU) and, from the
    environment its launcher or a config file set, the engine (DDP, FSDP, DeepSpeed); `finetune run --cpu`
    (FINETUNE_CPU, or accelerate's ACCELERATE_USE_CPU) forces the CPU."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs

    from finetune.rundir import RunLayout
    from finetune.tracking import accelerator_arguments

    forced_cpu = os.environ.get("FINETUNE_CPU") == "1" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    # Several processes on a machine without an accelerator: accelerate would start each alone; gloo joins
    # them (as accelerate's CPU type, or under DeepSpeed, which accelerate's CPU type would switch off).
    on_cpu = forced_cpu or not torch.accelerator.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    cpu = forced_cpu or (several and on_cpu and not deepspeed)
    precision = recipe.train.mixed_precision
    # "nccl" is the class's default, which accelerate does not pass on: it then picks the device's own backend.
    timeout = InitProcessGroupKwargs(backend="gloo" if on_cpu and several else "nccl",
                                     timeout=timedelta(minutes=recipe.train.distributed_timeout_minutes))
    try:
        # Accumulation is done by the training loop (exact on a short last window), not by accelerate.
        accelerator = Accelerator(
            mixed_precision=precision,
            cpu=cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
            kwargs_handlers=[timeout],
            **accelerator_arguments(recipe.track.report_to, RunLayout(recipe.run_dir).tracking),
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
            f"'{precision}'. Fix what accelerate names, or set train.mixed_precision: no."
        ) from None
    if accelerator.distributed_type == "DEEPSPEED":
        _configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, recipe)
    if precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would accept it and quietly train in fp32 (no autocast, no gradient scaler).
        raise FinetuneError(
            "train.mixed_precision: 'fp16' needs a GPU, and this run is on the CPU; "
            "set train.mixed_precision to bf16 (autocast on the CPU too) or no."
        )
    return accelerator


def _configure_deepspeed(config: dict, recipe: Recipe) -> None:
    """The recipe decides batch, accumulation and clipping, also under DeepSpeed: finetune accumulates the
    window itself (one engine step per window), so the engine's own accumulation must stay 1."""
    steps = config.get("gradient_accumulation_steps", 1)
    if steps not in (1, "auto"):
        raise FinetuneError(
            f"The DeepSpeed config sets gradient_accumulation_steps: {steps}; finetune accumulates train.grad_accum_steps "
            "itself (exactly, also on an epoch's short last window). Set it to 1 in the accelerate config and use "
            "train.grad_accum_steps."
        )
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
    config["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size


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


def is_sharded(accelerator) -> bool:
    """Whether no process holds the whole model: FSDP, or DeepSpeed ZeRO stage 3."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def check_engine(accelerator, recipe: Recipe, task, method) -> None:
    """Refuse, before any training, what a sharded engine cannot give this run."""
    import inspect

    if not is_sharded(accelerator):
        return
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if "state_dict" not in inspect.signature(task.save).parameters:
        raise FinetuneError(
            f"The task '{recipe.task.name}' cannot save a model sharded by {engine} (its save takes no gathered "
            "state_dict). Train it with DDP (finetune run --processes N) or DeepSpeed ZeRO-2 "
            "(recipes/accelerate/deepspeed-zero2.yaml), which keep a whole copy on every process."
        )
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if engine == "DEEPSPEED" else {}
    if zero and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise FinetuneError(
            "The DeepSpeed ZeRO-3 config does not gather the weights for saving, so no final model could be written: "
            "set zero3_save_16bit_model: true under deepspeed_config (as recipes/accelerate/deepspeed-zero3-offload.yaml does)."
        )
    if recipe.writes_merged and method.produces_adapter:
        raise FinetuneError(
            f"output.merged: merging the adapter needs the whole model on one process, which {engine} does not keep. "
            "Leave output.merged (and hub.artifacts) off for this run, and merge the saved adapter afterwards."
        )


def check_shared_run_dir(accelerator, root) -> None:
    """Over several machines, the run directory must be one shared filesystem (NFS, Lustre ...): the main
    process commits every checkpoint that all processes wrote parts of, and resume reads them on every
    machine. Checked by a file the main process writes and every process must see."""
    import uuid
    from pathlib import Path

    import torch
    from accelerate.utils import broadcast_object_list

    # Processes on this machine: torchrun (and accelerate launch) say LOCAL_WORLD_SIZE, DeepSpeed's launchers LOCAL_SIZE.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or accelerator.num_processes)
    if local >= accelerator.num_processes:
        return  # one machine
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = Path(root) / f".shared-{token[0]}"
    if accelerator.is_main_process:
        probe.write_text("finetune: checking the run directory is shared by every machine\n")
    accelerator.wait_for_everyone()
    seen = accelerator.gather(torch.tensor([probe.is_file()], device=accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if not all(seen):
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        raise FinetuneError(
            f"The run directory {root} is not shared by every machine: processes {blind} cannot see what the main "
            "process writes there. A run over several machines needs output.dir on a filesystem they all mount "
            "(NFS, Lustre, GPFS ...): checkpoints are committed by the main process and resumed on every machine."
        )


def peak_memory(accelerator) -> dict:
    """This process's peak memory so far, in MB: host (resident set) and, on a GPU, allocated device memory."""
    import resource
    import sys

    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    peak = {"host": round(rss_kb / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if accelerator.device.type == "cuda":
        peak["gpu"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**20, 1)
    return peak
