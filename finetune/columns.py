"""The columns a task reads: one check, so every task (and plugin) names a missing column alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict


def require_columns(splits: DatasetDict, columns: tuple[str, ...], *, example: str | None = None,
                    hints: dict[str, str] | None = None) -> None:
    """Raise DataError naming the first split that lacks one of `columns`, its actual columns, and
    the `data.columns` rename that fixes it (`example`, default `{your_column: COLUMN}`), followed
    by `hints[column]` when given."""
    for role, split in splits.items():
        for column in columns:
            if column not in split.column_names:
                rename = example or f"{{your_column: {column}}}"
                hint = f" {hints[column]}" if hints and column in hints else ""
                raise DataError(
                    f"The {role} split has no '{column}' column (its columns: {split.column_names}). "
                    f"Map yours with data.columns, e.g. data.columns: {rename}.{hint}"
                )
