"""Disk space: what a run will write, whether it fits, and a clear message when a write fails for
lack of space (a full disk, a quota, a file-size limit) or permission (a read-only filesystem).

Every output is written beside its place and moved in once complete (finetune.files), so a failed
write loses nothing complete: the message names the last complete checkpoint to resume from.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError

REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file would exceed this process's file-size limit (`ulimit -f`)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "this user may not write there (permission denied)",
}
_TEXTS = {os.strerror(code): reason for code, reason in REASONS.items()}  # errors that carry only the text


class CannotWrite(FinetuneError):
    """A write failed for lack of space or permission; the message names the path, the space needed and the
    checkpoint to resume from."""


def expected_bytes(model, *, adapter: bool, merged: bool) -> dict[str, int]:
    """What one checkpoint and the final model take, from the model's parameters: a checkpoint holds the
    trainable weights and the buffers, with two AdamW states (float32) for each trainable weight; the final model
    is the adapter (or the whole model), plus the merged copy when one is written."""
    import torch

    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    state = model.state_dict(keep_vars=True)  # persistent buffers only (not a BERT's position ids)
    buffers = sum(t.nbytes for t in {id(t): t for t in state.values() if not isinstance(t, torch.nn.Parameter)}.values())
    whole = sum(p.nbytes for p in model.parameters()) + buffers
    # A merged copy is the base with the adapter folded in: the whole model but for the adapter's own weights.
    final = (trainable if adapter else whole) + (whole - trainable if merged else 0)
    return {"checkpoint": 3 * trainable + buffers, "final_model": final}


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def space_warning(path: Path, needed: dict[str, int]) -> str | None:
    """A warning when the filesystem of `path` has less free space than a checkpoint plus the final model."""
    free = free_bytes(path)
    if free >= needed["checkpoint"] + needed["final_model"]:
        return None
    return (f"warning: {size(free)} free on the filesystem of {path}, but a checkpoint takes about "
            f"{size(needed['checkpoint'])} and the final model about {size(needed['final_model'])}. Free some space "
            "or set output.dir to a larger disk, or the run will stop when a write fails (resumably).")


@contextmanager
def writing(what: str, path: Path, *, needed: int | None, checkpoints: Path) -> Iterator[None]:
    """Turn a write that fails for lack of space into one CannotWrite message; any other error passes."""
    try:
        yield
    except Exception as exc:
        reason = disk_problem(exc, path, needed)
        if reason is None:
            raise
        raise CannotWrite(_message(what, path, reason, needed, checkpoints, exc)) from None


def disk_problem(exc: BaseException, path: Path | None = None, needed: int | None = None) -> str | None:
    """Why `exc` is a lack of space, or None. OSErrors carry an errno; the writers that do not (torch.save: "file
    write failed", "unexpected pos 17856 vs 17748"; safetensors) raise a RuntimeError or their own error, and then
    the filesystem of `path` is asked. A finetune message, running out of memory, a collective that timed out are
    never taken for a full disk."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in REASONS:
            return REASONS[seen.errno]
        for text, reason in _TEXTS.items():
            if text in str(seen) and reason != REASONS[errno.EACCES]:  # that text may come from a read
                return reason
        seen = seen.__cause__ or seen.__context__
    if path is None or not _may_be_a_write(exc):
        return None
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (needed is None or needed > limit):
        return f"{REASONS[errno.EFBIG]}, {size(limit)}"
    if not os.access(_existing(path), os.W_OK):
        return "the directory is not writable"
    if needed is not None and free_bytes(path) < needed:
        return REASONS[errno.ENOSPC]
    return None


def _may_be_a_write(exc: BaseException) -> bool:
    """A writer's error that does not say why: a RuntimeError of torch's serialisation, safetensors' own error."""
    if isinstance(exc, FinetuneError) or "OutOfMemory" in type(exc).__name__:
        return False
    text = str(exc).lower()
    if any(sign in text for sign in ("timed out", "timeout", "connection", "nccl", "gloo")):
        return False
    return isinstance(exc, RuntimeError) or "Safetensor" in type(exc).__name__ or isinstance(exc, OSError)


def _message(what: str, path: Path, reason: str, needed: int | None, checkpoints: Path, exc: BaseException) -> str:
    from finetune.training.checkpoint import latest_checkpoint

    space = f"{size(free_bytes(path))} free there"
    if needed:
        space += f", about {size(needed)} needed"
    last = latest_checkpoint(checkpoints)
    resume = (f"continue with `finetune run RECIPE --resume` from the last complete checkpoint, {last}" if last else
              "no checkpoint was complete yet, so start the run again")
    error = str(exc).splitlines()[0][:160] if str(exc) else ""
    return (f"Could not write {what} to {path}: {reason} ({space}; {type(exc).__name__}: {error}). Nothing complete "
            f"was deleted. Free some space (or set output.dir to another disk, one this user may write to), then {resume}.")


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a run directory not made yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
