"""Trainer state that travels in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps completed."""
    tokens_seen: int = 0
    """Training tokens consumed (global, all processes)."""
    epoch: int = 0
    """Data epoch the loader is in."""
    best_val_loss: float = math.inf
    """Lowest val_loss so far (drives the 'best' checkpoint)."""
    wall_time: float = 0.0
    """Seconds spent training, summed over every resume."""
    last_val_loss: float | None = None
    """val_loss of the latest evaluation."""
    last_val_step: int | None = None
    """Step at which last_val_loss was measured (None in checkpoints written before it was recorded)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, v)
