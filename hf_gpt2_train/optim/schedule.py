"""The learning-rate schedule: a pure function of the optimizer step (no scheduler object to step, save or restore).

``cosine`` (build-nanogpt's recipe): linear warmup over ``warmup_steps``, then a cosine from the peak down to
``peak * min_lr_ratio`` at ``max_steps``.

``wsd`` (warmup-stable-decay): the same warmup, the peak held constant, then over the last ``decay_fraction`` of
``max_steps`` a decay to ``peak * min_lr_ratio`` shaped ``1 - sqrt(progress)`` (progress 0 -> 1 across the
decay), the cooldown shape that Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training beyond Fixed
Training Durations") found better than a linear one. Until its decay starts, a WSD run's lr does not depend on
``max_steps``: a run resumed from the stable phase with a larger ``--max_steps`` just continues (one info line,
no warning), and ``--decay_now`` cools a run down from any checkpoint of its stable phase.

The AdamW lr (``--learning_rate``) and the Muon lr (``--muon_learning_rate``) follow the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hf_gpt2_train.config import Config, OptimConfig

SCHEDULES = ("cosine", "wsd")
# Keys whose change on resume changes the lr from the resume step on.
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "learning_rate", "min_lr_ratio", "lr_schedule", "decay_fraction",
                 "muon_learning_rate")


def decay_start(o: OptimConfig) -> int:
    """First step of the decay: cosine decays from the end of warmup, WSD over the last decay_fraction."""
    if o.lr_schedule != "wsd":
        return o.warmup_steps
    return max(o.warmup_steps, o.max_steps - round(o.decay_fraction * o.max_steps))


def lr_at(step: int, cfg: Config, peak: float | None = None) -> float:
    """The lr of optimizer step ``step`` (0-based) for a schedule peaking at ``peak`` (default: learning_rate)."""
    o = cfg.optim
    max_lr = o.learning_rate if peak is None else peak
    min_lr = max_lr * o.min_lr_ratio
    if step < o.warmup_steps:
        return max_lr * (step + 1) / o.warmup_steps
    if step >= o.max_steps:
        return min_lr
    start = decay_start(o)
    if o.lr_schedule == "wsd":
        if step < start:
            return max_lr
        progress = (step - start) / max(1, o.max_steps - start)
        return max_lr - math.sqrt(progress) * (max_lr - min_lr)  # exactly the peak at the decay's first step
    ratio = (step - start) / max(1, o.max_steps - start)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    """Set every param group's lr for ``step`` (Muon groups: the Muon lr); returns the AdamW lr (logged)."""
    lr = lr_at(step, cfg)
    muon_lr = lr_at(step, cfg, peak=cfg.optim.muon_learning_rate)
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        group["lr"] = muon_lr if group.get("muon") else lr
    return lr


def start_decay_now(saved_config: dict[str, Any] | None, cfg: Config, step: int) -> str:
    """``--decay_now`` on a run resumed at ``step``: set ``max_steps`` so that the WSD decay starts at ``step`` and
    takes ``decay_fraction`` of the whole run (the smallest such max_steps), or, when the checkpoint is already in
    the decay its own schedule started, continue that decay (so resuming an interrupted cooldown with the same
    command line does not restart it). Clears ``decay_now`` (the saved config describes the new schedule) and
    returns the line to log."""
    o = cfg.optim
    o.decay_now = False
    old = (saved_config or {}).get("optim") or {}
    if old.get("lr_schedule") == "wsd":
        before = Config.from_dict({"optim": {k: old[k] for k in SCHEDULE_KEYS if k in old}}).optim
        if step >= decay_start(before):
            o.max_steps, o.decay_fraction = before.max_steps, before.decay_fraction
            return (f"--decay_now: step {step:,} is already in the decay that started at step "
                    f"{decay_start(before):,}: continuing it to step {o.max_steps:,}")
    # max_steps - round(f * max_steps) grows by 0 or 1 per step (f < 1): the first max_steps reaching `step` hits it.
    o.max_steps = step
    while o.max_steps - round(o.decay_fraction * o.max_steps) < step:
        o.max_steps += 1
    return (f"--decay_now: the lr decays (1 - sqrt) from step {step:,} to {o.learning_rate * o.min_lr_ratio:.2e} at "
            f"step {o.max_steps:,} ({o.max_steps - step:,} steps, decay_fraction {o.decay_fraction:g} of the run); "
            f"max_steps is now {o.max_steps:,}")


@dataclass
class ScheduleChange:
    """What a resume changed in the LR schedule: one line, a warning unless it is a harmless WSD extension."""

    message: str
    warning: bool


def schedule_change(saved_config: dict[str, Any] | None, cfg: Config, step: int) -> ScheduleChange | None:
    """How a resume at ``step`` changes the LR schedule the checkpoint was trained with (None: unchanged).

    A WSD run resumed from its stable phase with another ``max_steps``/``decay_fraction`` keeps its lr at the resume
    step: an info line saying where the decay now runs. Any other change (a cosine run's new length, a new peak, a
    WSD run re-extended from inside its decay, which jumps back to the peak) is a warning with the old and new lr.
    """
    old = (saved_config or {}).get("optim") or {}
    changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != getattr(cfg.optim, k)]
    if not changed:
        return None
    before = Config.from_dict({"optim": {k: old[k] for k in SCHEDULE_KEYS if k in old}})
    diffs = ", ".join(f"{k} {old[k]} -> {getattr(cfg.optim, k)}" for k in changed)
    o, b = cfg.optim, before.optim
    lr_new, lr_old = lr_at(step, cfg), lr_at(step, before)
    unchanged_now = lr_new == lr_old and lr_at(step, cfg, o.muon_learning_rate) == lr_at(step, before,
                                                                                          b.muon_learning_rate)
    if o.lr_schedule == b.lr_schedule == "wsd" and unchanged_now:
        return ScheduleChange(
            f"resuming a WSD run with {diffs}: the lr at step {step:,} stays {lr_new:.2e}; its decay now runs from "
            f"step {decay_start(o):,} to {o.max_steps:,} (was {decay_start(b):,} to {b.max_steps:,})", warning=False)
    hint = ("; this WSD checkpoint is already in its decay: extend a run from a checkpoint of its stable phase "
            f"(before step {decay_start(b):,}) to keep the lr"
            if b.lr_schedule == "wsd" and step >= decay_start(b) else "")
    return ScheduleChange(
        f"resuming with a changed LR schedule ({diffs}): the schedule now ends at step {o.max_steps:,} "
        f"(was {b.max_steps:,}) and the lr at step {step:,} becomes {lr_new:.2e} (was {lr_old:.2e}); pass the old "
        f"values to keep the old schedule{hint}", warning=True)
