"""Runs that heal themselves: outlier updates skipped, loss spikes rolled back, hangs caught.

* ``UpdateGuard`` (guard.py): per-step skip flag on the device (non-finite, or loss / grad-norm z-score outlier
  against a robust baseline that spiking values never enter), fed to fused AdamW's ``found_inf``; fp16
  GradScaler overflows are not counted.
* ``SpikeRollback`` (rollback.py): a sustained stretch of spiking steps reloads the last good checkpoint
  in-process (without one before it: gives the stretch's skipped updates back to the schedule) and skips the
  stretch's data for good; at most ``max_rollbacks``.
* ``HangWatchdog``, ``collective_kwargs`` (watchdog.py): stack dumps and exit code 5 when no step completes in
  time; explicit collective timeouts.
* ``Resilience``: what the trainer holds; it wires the three to the trainer's state, loader and checkpoints.

docs/resilience.md describes the defaults and the measurements behind them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_gpt2_train.config import Config
from hf_gpt2_train.resilience.guard import GuardReport, StepRecord, UpdateGuard
from hf_gpt2_train.resilience.rollback import SpikeRollback
from hf_gpt2_train.resilience.watchdog import HangWatchdog, collective_kwargs

__all__ = ["GuardReport", "HangWatchdog", "Resilience", "SpikeRollback", "StepRecord", "UpdateGuard",
           "collective_kwargs"]


class Resilience:
    """The trainer's handle: ``guard`` in the step, ``collect`` at logging steps, ``maybe_roll_back`` after
    them, ``watchdog`` around the loop (``watchdog.beat`` after every step)."""

    def __init__(self, cfg: Config, accelerator: Any, state: Any, loader: Any, checkpoints: Any,
                 output_dir: str | Path):
        r = cfg.resilience
        multi = accelerator.num_processes > 1
        self.guard = UpdateGuard(r, cfg.optim.on_nonfinite, accelerator.device,
                                 (lambda t: accelerator.reduce(t, reduction="mean")) if multi else None,
                                 capacity=cfg.tracking.logging_steps)
        state.attach("update_guard", self.guard)  # the window travels in every checkpoint
        self.rollback = SpikeRollback(r, state, loader, checkpoints, cfg.optim.seq_len, cfg.optim.total_batch_size)
        self.watchdog = HangWatchdog(r, output_dir, accelerator.process_index)
        self.state = state
        self.has_scaler = accelerator.scaler is not None

    def collect(self) -> dict[str, float]:
        """At a logging step: read the guard's records, count and log skips, look for spikes; the metrics."""
        report = self.guard.collect()
        self.state.skipped_updates += len(report.skipped)
        self.rollback.observe(report.records)
        metrics: dict[str, float] = {"train/skipped_updates": len(report.skipped)}
        if self.has_scaler:
            metrics["train/scaler_overflows"] = report.scaler_overflows
        return metrics

    def maybe_roll_back(self, tracker: Any) -> bool:
        """After a logging step: roll back if a spike calls for it (True: the run continues from an earlier step)."""
        if not self.rollback.enabled:
            return False
        return self.rollback.roll_back(tracker)
