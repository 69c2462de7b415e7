"""Trainer state that travels in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


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
    skipped_updates: int = 0
    """Updates the update guard skipped (non-finite or outlier), counted at logging steps."""
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    """Spike rollbacks so far (resilience/rollback.py): steps, checkpoint reloaded, training data skipped."""

    def __post_init__(self) -> None:
        self._attached: dict[str, Any] = {}  # not a field: asdict() ignores it

    def attach(self, name: str, component: Any) -> None:
        """Save and restore ``component`` (``state_dict``/``load_state_dict`` of plain values) with this state."""
        self._attached[name] = component

    def state_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, component in self._attached.items():
            d[name] = component.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if k in self._attached:
                self._attached[k].load_state_dict(v)
            elif hasattr(self, k) and not k.startswith("_"):
                setattr(self, k, v)
