"""Where each weight's precision is decided: loaded in `model.dtype`, trained in float32, frozen
modules stored in the autocast precision.

AdamW on bfloat16 weights loses every update smaller than bfloat16's resolution, so whatever
precision the base is loaded in, the weights that train are kept in float32 (accelerate's autocast
computes in half precision from them). The components a task declares frozen (`TaskModel.frozen`: a
diffusion pipeline's VAE and text encoder) never update and are not part of the saved artifact:
under mixed precision they are stored in the autocast precision, as diffusers' training scripts
store them, which halves their memory and changes no result beyond autocast's own rounding.
"""

from __future__ import annotations

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def load_dtype(name: str):
    """model.dtype as `build_model` takes it: a torch dtype, or None for the checkpoint's own ("auto")."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def settle_dtypes(model, frozen_components: list, mixed_precision: str) -> None:
    """Trainable parameters to float32; the task's frozen components to the autocast precision, if any."""
    import torch

    from finetune.errors import FinetuneError

    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if not hasattr(p, "ds_numel")]  # ZeRO-3 sets its own dtypes
        if not any(p.requires_grad for p in own):
            continue
        for parameter in own:
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        for name, buffer in module.named_buffers(recurse=False):  # a trained batch norm's statistics, with its weights
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(module, name, buffer.float())
    half = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if half and mixed_precision == "no":
        raise FinetuneError(
            f"model.dtype: the frozen weights are {' and '.join(sorted(half))} while the trained ones are float32, and "
            "without autocast their activations cannot meet. Set train.mixed_precision: bf16 (fp16 on a GPU), or "
            "model.dtype: float32."
        )
    if mixed_precision in AUTOCAST_DTYPES:
        dtype = getattr(torch, AUTOCAST_DTYPES[mixed_precision])
        for module in frozen_components:
            module.to(dtype)


def parameter_dtypes(model) -> dict[str, dict[str, int]]:
    """Parameter counts per dtype, trainable and frozen: {"trainable": {"float32": n}, "frozen": {...}}."""
    counts: dict[str, dict[str, int]] = {"trainable": {}, "frozen": {}}
    for parameter in model.parameters():
        side = counts["trainable" if parameter.requires_grad else "frozen"]
        dtype = str(parameter.dtype).removeprefix("torch.")
        side[dtype] = side.get(dtype, 0) + parameter.numel()
    return counts
