"""Checkpoints of what training changes, not of the whole model.

A LoRA or feature-extraction run changes a few parameters of a large frozen base; saving the base
at every checkpoint (accelerate's `save_state` does) costs its full size each time: gigabytes for
a 7B model. Through accelerate's own save/load hooks, a checkpoint holds only the trainable
parameters and the buffers (batch-norm statistics), next to the optimizer, scheduler, RNG and
sampler states accelerate saves anyway. Resume rebuilds the frozen base from the model source, as
the run started, and checks it against the base's fingerprint stored in the checkpoint: a base
whose weights changed (a model folder overwritten, a Hub branch moved on) is refused, never
silently combined with adapters trained on another.

Under FSDP and DeepSpeed ZeRO-3 the engines save their own sharded checkpoints of the whole model;
ZeRO-2 leaves the frozen weights out of its own (`exclude_frozen_parameters`), and the fingerprint
check applies to it as to a plain run.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

from finetune.errors import FinetuneError

WEIGHTS_FILE = "model.safetensors"  # accelerate's name for the first prepared model's weights
FINGERPRINT_FILE = "base_fingerprint.json"


def shared_fingerprint(accelerator, model) -> dict[str, list]:
    """The main process's `base_fingerprint` of the unprepared `model`, on every process (a rank that
    loaded its base on the meta device, as FSDP's low-memory loading does, cannot compute its own)."""
    from accelerate.utils import broadcast_object_list

    fingerprint = [base_fingerprint(model) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(fingerprint)
    return fingerprint[0]


def base_fingerprint(model) -> dict[str, list]:
    """Per frozen parameter: shape, dtype, and its sum and norm in float64. Cheap: one reduction per
    tensor, no copy. Parameters not held here (on the meta device, or partitioned by ZeRO-3, whose
    checkpoints keep the frozen weights) are left out."""
    import torch

    digests = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or parameter.device.type == "meta" or hasattr(parameter, "ds_numel"):
            continue
        data = parameter.detach()
        total = float(data.sum(dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(data, dtype=torch.float64))
        digests[name] = [list(data.shape), str(data.dtype).removeprefix("torch."), total, norm]
    return digests


def same_weights(a: list, b: list | None) -> bool:
    """Whether two digests describe the same tensor, up to the rounding of a reduction in another order
    (another device, another thread count): sums within 1e-6 of the norm's scale."""
    if b is None or a[:2] != b[:2]:
        return False
    scale = max(abs(a[3]), 1e-12)
    numel = max(math.prod(a[0]), 1)
    return abs(a[3] - b[3]) <= 1e-6 * scale and abs(a[2] - b[2]) <= 1e-6 * scale * math.sqrt(numel)


class TrainableState:
    """Registers the hooks that keep the frozen weights out of a checkpoint of `model` (the prepared,
    possibly DDP-wrapped module), and checks a checkpoint's base before it is loaded."""

    def __init__(self, accelerator, model, fingerprint: dict):
        from accelerate.utils import DistributedType

        self.model = model
        self.fingerprint = fingerprint
        trained = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
        self.kept = {name for name, _ in trained} | {name for name, _ in model.named_buffers(remove_duplicate=False)}
        # The names of each trained tensor (tied weights have several; a checkpoint holds one of them).
        self.aliases: dict[int, set[str]] = {}
        for name, parameter in trained:
            self.aliases.setdefault(id(parameter), set()).add(name)
        self.slim = accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        # DeepSpeed's engine leaves the frozen weights out of its own checkpoint when asked; not under ZeRO-3,
        # whose partitioned base this run cannot fingerprint, so its checkpoints keep the whole model.
        plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
        excluding = plugin is not None and plugin.zero_stage < 3
        self.save_options = {"exclude_frozen_parameters": True} if excluding else {}
        self.load_options = {"load_module_strict": False} if excluding else {}
        if self.slim:
            accelerator.register_save_state_pre_hook(self._keep_trainable)
            accelerator.register_load_state_pre_hook(self._load_trainable)

    def write_fingerprint(self, directory: Path) -> None:
        (directory / FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint))

    def check_base(self, checkpoint: Path) -> None:
        """Refuse a checkpoint trained on other frozen weights than the ones loaded now."""
        file = checkpoint / FINGERPRINT_FILE
        if not file.is_file():
            return  # a checkpoint from before slim checkpoints: it holds the whole model
        saved = json.loads(file.read_text())
        differing = sorted(name for name in saved.keys() | self.fingerprint.keys()
                           if name not in saved or not same_weights(saved[name], self.fingerprint.get(name)))
        if differing:
            raise FinetuneError(
                f"--resume: {checkpoint} was trained on another base model: {len(differing)} frozen weights differ from the "
                f"model loaded now (first: {differing[0]}). Its checkpoints hold only what training changed, so they "
                "resume only on the same base weights: restore the model that model.name pointed to when the run "
                "started (pin model.revision for a Hub model), or start over with --overwrite."
            )

    # -- accelerate's hooks (plain and DDP runs) -------------------------------------------
    def _keep_trainable(self, models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            if model is self.model and i < len(weights):
                # An OrderedDict, as accelerate gives it: its save then drops tied duplicates for safetensors.
                weights[i] = OrderedDict((k, v) for k, v in weights[i].items() if k in self.kept)

    def _load_trainable(self, models, input_dir) -> None:
        """Load the trainable weights ourselves (accelerate's load is strict: it wants every weight)."""
        from safetensors.torch import load_file

        if self.model not in models or not (Path(input_dir) / FINGERPRINT_FILE).is_file():
            return  # not ours, or a checkpoint from before slim checkpoints: accelerate loads the whole model
        models.remove(self.model)
        state = load_file(str(Path(input_dir) / WEIGHTS_FILE))
        if not set(state) <= self.kept:
            strangers = sorted(set(state) - self.kept)
            raise FinetuneError(
                f"--resume: {input_dir} holds weights this run does not train ({strangers[0]} …): it was written by "
                "another method or model. Resume with the recipe the run started with, or start over with --overwrite."
            )
        missing = [sorted(names)[0] for names in self.aliases.values() if not names & set(state)]
        if missing:
            raise FinetuneError(
                f"--resume: {input_dir} lacks trained weights of this run ({missing[0]} …): it was written by another "
                "method or model. Resume with the recipe the run started with, or start over with --overwrite."
            )
        self.model.load_state_dict(state, strict=False)
