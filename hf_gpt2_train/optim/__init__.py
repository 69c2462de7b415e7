"""The optimizer and the learning-rate schedule: what the trainer builds once and sets before every step.

* ``build_optimizer`` (build.py): ``--optimizer adamw`` (torch's fused AdamW) or ``muon`` (``MuonWithAdamW``:
  Muon on the blocks' weight matrices, AdamW on embeddings, biases and LayerNorms); ``optimizer_mismatch`` for
  resume.
* ``MuonWithAdamW``, ``orthogonalise`` (muon.py): one optimizer, device-side skips, DDP and FSDP2.
* ``lr_at``, ``set_lr``, ``schedule_change``, ``start_decay_now`` (schedule.py): cosine or warmup-stable-decay,
  a pure function of the step.

docs/speed.md has the measurement behind the choices (Muon vs AdamW, WSD vs cosine).
"""

from __future__ import annotations

from hf_gpt2_train.optim.build import OPTIMIZERS, build_optimizer, muon_row_blocks, optimizer_mismatch
from hf_gpt2_train.optim.muon import MuonWithAdamW, orthogonalise
from hf_gpt2_train.optim.schedule import (
    SCHEDULE_KEYS,
    SCHEDULES,
    ScheduleChange,
    decay_start,
    lr_at,
    schedule_change,
    set_lr,
    start_decay_now,
)

__all__ = ["OPTIMIZERS", "SCHEDULES", "SCHEDULE_KEYS", "MuonWithAdamW", "ScheduleChange", "build_optimizer",
           "decay_start", "lr_at", "muon_row_blocks", "optimizer_mismatch", "orthogonalise", "schedule_change",
           "set_lr", "start_decay_now"]
