"""Writing outputs so that a crash never leaves half of one: files and folders are written beside
their final place under a hidden temporary name and moved into place once complete.

Every output of a run goes through here: checkpoints, models, samples, pictures, logs and JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(final: Path) -> Path:
    """The hidden sibling that `final` is written as: `.NAME.tmp`, which no reader of the run looks at."""
    return final.with_name(f".{final.name}.tmp")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path to write a file or a folder into; it replaces `final` when the block completes,
    and is removed when the block raises. What a crashed run left at that path is cleared first."""
    tmp = temporary_path(final)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    commit(tmp, final)


def commit(tmp: Path, final: Path) -> None:
    """Move a completely written `tmp` over `final` (a rename: atomic for a file on POSIX; a folder
    that exists is removed first)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
