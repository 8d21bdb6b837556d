"""The step log: one JSON object per line, flushed as written, so a crash loses nothing logged."""

from __future__ import annotations

import json
from pathlib import Path


class StepLog:
    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def read_steplog(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
