"""Modules inside a model: which lie within which, and the ecosystem's switches they carry.

Tasks name modules (`TaskModel.head`, `TaskModel.frozen`) by their qualified names; methods and the
core match parameters and submodules against them with this one rule.
"""

from __future__ import annotations


def is_within(name: str, modules: list[str]) -> bool:
    """Whether the parameter or module `name` is one of `modules` or lies inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def enable_gradient_checkpointing(model) -> list[str]:
    """Turn on the ecosystem's own gradient checkpointing in every outermost submodule of `model` that
    has a switch and trains (frozen components need no backward): a transformers model
    (`gradient_checkpointing_enable`, non-reentrant, so frozen inputs still pass gradients to LoRA
    layers), a diffusers model (`enable_gradient_checkpointing`) or a timm model
    (`set_grad_checkpointing`). Returns the names of the modules switched ("" for `model` itself)."""
    switched: list[str] = []
    for name, module in model.named_modules():
        if "" in switched or is_within(name, switched):  # inside a module already switched
            continue
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif getattr(module, "_supports_gradient_checkpointing", False) and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        elif callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(True)
        else:
            continue
        switched.append(name)
    return switched
