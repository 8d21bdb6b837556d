"""Images for the tasks that read them (image classification, text-to-image): open any stored
form as RGB, and find the unreadable ones before training starts, naming their files.

An image column is kept undecoded (`datasets.Image(decode=False)`: a path or bytes per row) and
decoded by the task's transform, so a checked dataset is decoded exactly once per use.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from finetune.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from PIL import Image

SKIP_OPTION = "skip_unreadable_images"  # the task option that check_images' errors suggest
_SHOWN = 5  # unreadable files named in an error


class ImageOptions(BaseModel):
    """The options every task that reads images has: its Options inherit them."""

    model_config = ConfigDict(extra="forbid")
    skip_unreadable_images: bool = Field(
        False, description="Skip (and count) images that cannot be decoded instead of stopping with an error naming them."
    )


def open_image(value, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image from a decoded PIL image or an undecoded {"path", "bytes"} value.
    `draft` lets JPEG decoding scale down on the fly (a check, not training)."""
    from PIL import Image, ImageOps

    if isinstance(value, Image.Image):
        image = value
    else:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        if draft:
            image.draft("RGB", draft)
    image = ImageOps.exif_transpose(image)  # phone photos stand upright, as datasets' own decoding does
    if image.mode.startswith("I;16"):  # 16-bit greyscale: RGB conversion would clip it to white
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")  # decodes every pixel: a truncated file fails here


def check_images(splits: DatasetDict, column: str, *, skip: bool) -> tuple[DatasetDict, dict[str, list[str]]]:
    """Decode every image of every split once (cached by `datasets`). Raise DataError naming the
    unreadable files, or, with `skip`, drop them; return the splits (images undecoded) and the
    names of the skipped files per split."""
    from datasets import Image as ImageFeature

    skipped: dict[str, list[str]] = {}
    for role in list(splits):
        split = splits[role]
        feature = split.features.get(column)
        if not isinstance(feature, ImageFeature):
            raise DataError(
                f"The '{column}' column of the {role} split holds {feature}, not images. Use an image folder "
                f"(data.path: a folder with one sub-folder per class) or a dataset whose '{column}' column is an Image feature; "
                f"rename another column with data.columns, e.g. {{img: {column}}}."
            )
        split = split.cast_column(column, ImageFeature(decode=False))
        bad = _unreadable(split, column, role)
        if bad and not skip:
            shown = "; ".join(f"{where} ({reason})" for _, where, reason in bad[:_SHOWN])
            more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
            raise DataError(
                f"{len(bad)} of {len(split)} images in the {role} split cannot be read: {shown}{more}. "
                f"Fix or remove these files, or set task.options.{SKIP_OPTION}: true to train without them."
            )
        if bad:
            rows = {row for row, _, _ in bad}
            split = split.select([i for i in range(len(split)) if i not in rows])
            skipped[role] = [where for _, where, _ in bad]
        splits[role] = split
    return splits, skipped


def _unreadable(split: Dataset, column: str, role: str) -> list[tuple[int, str, str]]:
    """(row, file or row label, reason) of every image that does not decode."""

    def check(values):
        problems = []
        for value in values:
            try:
                open_image(value, draft=(64, 64))
                problems.append("")
            except Exception as exc:  # PIL raises many types; each is this file's fault
                problems.append(_reason(exc))
        return {"problem": problems}

    workers = min(os.cpu_count() or 1, 8) if len(split) >= 5000 else None
    result = split.map(
        check, batched=True, input_columns=[column], remove_columns=split.column_names,
        num_proc=workers, desc=f"Checking {role} images",
    )
    found = []
    for row, problem in enumerate(result["problem"]):
        if problem:
            value = split[row][column]
            found.append((row, value.get("path") or f"row {row}", problem))
    return found


def _reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its message repeats the path, or a BytesIO repr
        return "not an image file PIL can read"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def skipped_images_note(run) -> list[str]:
    """The card's Limitations note on images `check_images` skipped (a task records them in data_facts
    as `unreadable_images_skipped`); [] when none were."""
    skipped = run.summary.get("data", {}).get("task", {}).get("unreadable_images_skipped")
    if not skipped:
        return []
    files = [name for names in skipped.values() for name in names]
    counts = ", ".join(f"{role}: {len(names)}" for role, names in skipped.items())
    shown = ", ".join(f"`{Path(name).name}`" for name in files[:5]) + (" ..." if len(files) > 5 else "")
    return [f"{len(files)} unreadable images were skipped ({counts}): {shown}. The split sizes above do not count them."]
