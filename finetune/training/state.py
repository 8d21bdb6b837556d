"""The trainer's state: what a checkpoint must hold besides the tensors, so that a resumed run
continues exactly where the interrupted one was. Written as `trainer_state.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer updates attempted (one per accumulation window); the schedule of logs, evaluations and checkpoints."""
    skipped_steps: int = 0
    """Updates the fp16 gradient scaler skipped (inf/NaN gradients): no weight or learning-rate change."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of `epoch` already trained on: where the data position resumes."""
    train_seconds: float = 0.0
    """Time spent in training steps, summed over every session of the run (no evaluation, no checkpointing)."""
    best: float | None = None
    """Best value of the early-stopping metric so far."""
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    """Every evaluation: step, epoch and metrics."""
    lr: float | None = None
    """The peak learning rate in force (train.lr); a resume may change it."""
    lr_changes: list[dict] = field(default_factory=list)
    """Resumes that changed train.lr: {"step", "from", "to"}."""

    @property
    def steps_taken(self) -> int:
        """Optimizer steps that changed the weights."""
        return self.step - self.skipped_steps

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})
