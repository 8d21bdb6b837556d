"""The step log: one JSON object per line, flushed as written, so a crash loses nothing logged. It is also
the one place that hands the records to the experiment trackers (finetune.tracking), so they log the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.files import write_text


class StepLog:
    def __init__(self, path: Path, enabled: bool, tracking=None):
        self.enabled, self.tracking = enabled, tracking
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self.tracking is not None:
                self.tracking.log_record(record)

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def truncate_steplog(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run logs those steps again."""
    if path.is_file():
        kept = [r for r in read_steplog(path) if r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_steplog(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
