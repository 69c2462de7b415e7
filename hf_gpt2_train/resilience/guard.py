"""The update guard: skip, on the device, an optimizer update whose loss or grad norm is non-finite or an outlier.

Each step's loss and grad norm are judged against a robust baseline of the values the guard has *learned*:
the last ``outlier_window`` steps whose update went in and whose loss was not spiking. Per quantity (the loss,
and the log of the grad norm: grad norms vary by factors):

* level: the lower of the medians of the last 3 and of the last 8 learned values. It follows the falling loss
  of early training within a step or two (the median of 3), yet a stretch of bad values must be the majority of
  the last 8 to raise it (the median of 8). Only values above it count (one-sided): a falling loss is below it.
* spread: 1.4826 x the median absolute deviation of the window's residuals, each learned value minus the
  level of the 8 learned values before it: the statistic being judged, so the spread holds the step-to-step
  noise and the slow wander of ordered data, while the constant offset that a trend gives it is removed.
* ``z = (x - level) / spread``.

Medians and the MAD ignore up to half of their values whatever they are, so a few bad values learned while the
window fills cannot move the baseline, and values flagged as spiking (skipped, or a loss z-score above
``spike_z_threshold`` although the update went in) are never learned. The loss is judged once
``outlier_min_steps`` values were learned. The grad norm is judged once the window is full: early training
has ordinary grad-norm spikes. Some come with a loss spike, the optimizer's own instability (the previous update
moved the weights too far; clipping and the next updates repair it): a step whose grad norm is more than
``grad_norm_spike_ratio`` times its level is therefore not skipped for its loss (bad data raised the grad norm at
most 6.6x in the measurements, instability spikes 39-107x). It still counts as spiking. The update is skipped
when a value is non-finite or a z-score exceeds its threshold. docs/resilience.md has how each constant was
measured.

The decision is a device tensor handed to fused AdamW as ``found_inf`` (the same mechanism a GradScaler uses), so
the host never waits for the device on non-logged steps; every step's numbers are written into a small device
buffer that the logging step reads in one copy.

The loss is the mean over all processes (one scalar all-reduce per step, asynchronous on NCCL) and the grad
norm is the global one, so every rank takes the same decision on the same numbers.

With a GradScaler (fp16) an inf/NaN gradient is the scaler's normal overflow signal: the scaler skips that
update and lowers its scale by itself, so it is counted as a scaler overflow, never as non-finite (only a
non-finite *loss* is). An outlier skip is injected into the scaler's own ``found_inf`` and the scale it
would have lost is restored, so for the scaler that step never happened.

The learned values are part of the trainer state in every checkpoint (``TrainerState.attach``), so a resumed
run takes exactly the decisions of an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hf_gpt2_train.config import ResilienceConfig
from hf_gpt2_train.errors import NonFiniteLossError

log = logging.getLogger("hf_gpt2_train")

LEVEL_STEPS = (3, 8)
"""The baseline's level is the lower of the medians of the last 3 and the last 8 learned values."""
MAD_TO_STD = 1.4826
"""The MAD of a normal distribution times this is its standard deviation."""

# Bits of a step's flags (a float in the record buffer; exact for these small integers).
NONFINITE, LOSS_OUTLIER, GRAD_OUTLIER, SCALER_OVERFLOW, LOSS_HIGH, INSTABILITY = 1, 2, 4, 8, 16, 32
SKIPPED = NONFINITE | LOSS_OUTLIER | GRAD_OUTLIER


@dataclass
class StepRecord:
    """What the guard saw at one step (read back at the logging step)."""

    step: int
    data: tuple[int, int]
    """Global training sequences ``[first, end)`` this step read (the loader's position before and after)."""
    loss: float
    grad_norm: float
    loss_z: float
    grad_norm_z: float
    flags: int
    grad_norm_ratio: float = float("nan")
    """The grad norm over its level (NaN before the loss is judged)."""

    @property
    def skipped(self) -> bool:
        """The guard skipped this update (non-finite or outlier; not a scaler overflow)."""
        return bool(self.flags & SKIPPED)

    @property
    def spiking(self) -> bool:
        """Skipped, or its loss was above the spike threshold: part of a sustained spike."""
        return bool(self.flags & (SKIPPED | LOSS_HIGH))

    def describe(self) -> str:
        why = []
        if self.flags & NONFINITE:
            why.append("non-finite")
        if self.flags & LOSS_OUTLIER:
            why.append(f"loss {self.loss:.3f} z {self.loss_z:.1f}")
        if self.flags & GRAD_OUTLIER:
            why.append(f"grad norm {self.grad_norm:.3g} z {self.grad_norm_z:.1f}")
        if self.flags & INSTABILITY:
            why.append(f"loss {self.loss:.3f} z {self.loss_z:.1f} with grad norm {self.grad_norm:.3g} = "
                       f"{self.grad_norm_ratio:.0f}x its level")
        return f"{self.step} ({', '.join(why)})"


@dataclass
class GuardReport:
    """The steps since the previous logging step."""

    records: list[StepRecord]

    @property
    def skipped(self) -> list[StepRecord]:
        return [r for r in self.records if r.skipped]

    @property
    def instabilities(self) -> list[StepRecord]:
        """Loss outliers that were not skipped because their grad norm exploded with them."""
        return [r for r in self.records if r.flags & INSTABILITY]

    @property
    def nonfinite(self) -> list[StepRecord]:
        return [r for r in self.records if r.flags & NONFINITE]

    @property
    def scaler_overflows(self) -> int:
        return sum(1 for r in self.records if r.flags & SCALER_OVERFLOW)


class UpdateGuard:
    """Decides per step, on the device, whether the optimizer update is skipped; see the module docstring."""

    def __init__(self, cfg: ResilienceConfig, on_nonfinite: str, device: torch.device,
                 reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None, capacity: int = 16):
        self.cfg = cfg
        self.on_nonfinite = on_nonfinite
        self.device = device
        self.reduce_mean = reduce_mean
        n = cfg.outlier_window
        self.window = torch.full((2, n), torch.nan, device=device)
        """Last ``n`` learned (loss, grad norm) pairs, a ring buffer indexed by ``learned % n``; NaN while empty."""
        self.learned = torch.zeros((), dtype=torch.long, device=device)
        """Values learned into the window so far."""
        self._age = torch.arange(n, device=device)
        self.thresholds = torch.tensor([cfg.loss_z_threshold, cfg.grad_norm_z_threshold], device=device)
        self.min_learned = torch.tensor([cfg.outlier_min_steps, n], device=device)
        """Learned values needed before the loss / the grad norm is judged."""
        self.log_spike_ratio = torch.tensor(cfg.grad_norm_spike_ratio, device=device).log()
        self.outliers_on = cfg.skip_outlier_updates
        self._buffer = torch.zeros(max(1, capacity), 6, device=device)
        self._pending: list[tuple[int, tuple[int, int]]] = []

    # ------------------------------------------------------------------------------------ every step
    def history(self) -> torch.Tensor:
        """The window in learning order, oldest first; NaN before the first learned value."""
        n = self.window.shape[1]
        return self.window[:, (self.learned + self._age) % n]

    def baseline(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Level and spread of (loss, log grad norm); see the module docstring."""
        hist = _judged_scale(self.history())
        before = hist.unfold(1, max(LEVEL_STEPS), 1)[:, :-1]  # the values before each one, from the 8th on
        residuals = hist[:, max(LEVEL_STEPS):] - _level(before)
        center = residuals.nanmedian(dim=1).values
        spread = MAD_TO_STD * (residuals - center[:, None]).abs().nanmedian(dim=1).values
        level = _level(hist)
        # A floor on the spread: a window of near-identical values must not turn rounding noise into outliers.
        return level, torch.maximum(spread, 1e-3 * (level.abs() + 1))

    def z_scores(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, grad norm)`` -> their z-scores (NaN where not enough was learned yet), and the grad norm's log
        ratio to its level."""
        level, spread = self.baseline()
        deviation = _judged_scale(values[:, None])[:, 0] - level
        return torch.where(self.learned >= self.min_learned, deviation / spread, torch.nan), deviation[1]

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, data: tuple[int, int],
              scaler_overflow: torch.Tensor | None = None) -> torch.Tensor:
        """The skip flag (0./1. device scalar) of this step's update; records the step for the logging step.

        ``loss`` is this process's mean loss, ``grad_norm`` the global pre-clip norm, ``scaler_overflow`` the
        GradScaler's found_inf when there is one. No host synchronisation.
        """
        if self.reduce_mean is not None:
            loss = self.reduce_mean(loss.detach())
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        finite = torch.isfinite(values)
        if scaler_overflow is None:
            nonfinite, overflow = ~finite.all(), torch.zeros((), dtype=torch.bool, device=self.device)
        else:  # inf/NaN gradients are the scaler's business; a non-finite loss is not
            nonfinite, overflow = ~finite[0], scaler_overflow.reshape(()).to(self.device) > 0
        z, log_ratio = self.z_scores(values)
        judged = finite.all() & ~overflow
        high = judged & (z > self.thresholds)  # NaN (not judged yet) compares False
        # A loss spike with an exploding grad norm: the weights, not the data (see the module docstring).
        instability = high[0] & (log_ratio > self.log_spike_ratio)
        high = torch.stack([high[0] & ~instability, high[1]])
        outlier = high.any() if self.outliers_on else torch.zeros_like(judged)
        skip = nonfinite | outlier
        loss_high = finite[0] & (z[0] > self.cfg.spike_z_threshold)
        # Spiking values stay out of the baseline even when their update goes in (outlier checks off, a loss
        # between spike_z_threshold and loss_z_threshold, an instability): a stretch of bad data cannot teach it.
        learn = judged & ~skip & ~high.any() & ~loss_high
        slot = (self.learned % self.window.shape[1]).reshape(1)
        self.window.index_copy_(1, slot, torch.where(learn, values, self.window.index_select(1, slot)[:, 0])[:, None])
        self.learned += learn.long()
        flags = (nonfinite.float() * NONFINITE + (outlier & high[0]).float() * LOSS_OUTLIER
                 + (outlier & high[1]).float() * GRAD_OUTLIER + overflow.float() * SCALER_OVERFLOW
                 + loss_high.float() * LOSS_HIGH + instability.float() * INSTABILITY)
        i = len(self._pending)
        if i == self._buffer.shape[0]:  # more steps between logging steps than expected: grow (rare)
            self._buffer = torch.cat([self._buffer, torch.zeros_like(self._buffer)])
        self._buffer[i] = torch.stack([values[0], values[1], z[0], z[1], flags, log_ratio.exp()])
        self._pending.append((step, data))
        return skip.float()

    @contextmanager
    def applied_to(self, optimizer: Any, skip: torch.Tensor, scaler: Any = None) -> Iterator[None]:
        """Around ``optimizer.step()``: the update is skipped on the device when ``skip`` is 1.

        Fused AdamW reads ``found_inf``; with a GradScaler the scaler sets it from its own per-device flags, so
        the skip goes into those, and the scale the scaler would then lose is restored afterwards.
        """
        if scaler is None:
            getattr(optimizer, "optimizer", optimizer).found_inf = skip
            yield
            return
        found = _found_inf_per_device(scaler, optimizer)
        overflow = sum(t.to(self.device) for t in found.values()) if found else torch.zeros((), device=self.device)
        for dev, t in found.items():
            found[dev] = torch.maximum(t, skip.to(t.device, t.dtype))
        scale, tracker = scaler._scale.clone(), scaler._growth_tracker.clone()
        yield
        ours_only = (skip > 0) & ~(overflow > 0)
        scaler._scale.copy_(torch.where(ours_only, scale, scaler._scale))
        scaler._growth_tracker.copy_(torch.where(ours_only, tracker, scaler._growth_tracker))

    @staticmethod
    def scaler_overflow(scaler: Any, optimizer: Any) -> torch.Tensor | None:
        """The scaler's found_inf for ``optimizer`` after unscaling (None without a scaler)."""
        if scaler is None:
            return None
        found = _found_inf_per_device(scaler, optimizer)
        return sum(found.values()) if found else None

    # ---------------------------------------------------------------------------------- logging steps
    def collect(self) -> GuardReport:
        """Read the steps recorded since the last call (one device->host copy); log and count skips.

        Raises NonFiniteLossError for a non-finite step when ``on_nonfinite`` is 'stop'.
        """
        n = len(self._pending)
        rows = self._buffer[:n].tolist() if n else []
        records = [StepRecord(step, data, *row[:4], int(row[4]), row[5])
                   for (step, data), row in zip(self._pending, rows, strict=True)]
        self._pending.clear()
        report = GuardReport(records)
        bad = report.nonfinite
        if bad:
            msg = (f"non-finite loss or grad norm in {len(bad)} step(s) up to step {records[-1].step} "
                   f"(steps {_first([str(r.step) for r in bad])}); those updates were skipped, weights are from the last finite step")
            if self.on_nonfinite == "stop":
                raise NonFiniteLossError(f"{msg}: lower --learning_rate, check the data, or pass --on_nonfinite skip")
        if report.instabilities:
            log.info("update guard: loss spike with an exploding grad norm (an optimizer instability, not bad data: "
                     "applied, clipped, not learned): step %s", _first([r.describe() for r in report.instabilities]))
        skipped = report.skipped
        if skipped:
            log.warning("update guard: skipped %d update(s): step %s", len(skipped),
                        _first([r.describe() for r in skipped]))
        return report

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The learned values, oldest first, as plain lists (exact for float32), so the trainer state stays
        comparable and picklable; independent of the window size."""
        kept = min(int(self.learned.item()), self.window.shape[1])
        return {"format": 2, "values": self.history()[:, self.window.shape[1] - kept:].cpu().tolist(),
                "learned": int(self.learned.item())}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        n = self.window.shape[1]
        if d.get("format") == 2:
            values, learned = torch.tensor(d["values"], dtype=self.window.dtype).reshape(2, -1), int(d["learned"])
        else:  # issue 13's format: a ring of the accepted values, slot = accepted % size, zeros while empty
            ring, learned = torch.tensor(d["window"], dtype=self.window.dtype), int(d["accepted"])
            size = ring.shape[1]
            values = ring[:, (learned + torch.arange(size)) % size][:, size - min(learned, size):]
            log.info("update guard: the checkpoint's window is the older format (%d values): they become the robust "
                     "baseline's history", values.shape[1])
        if values.shape[1] > n:
            log.info("update guard: the checkpoint holds %d learned values, this run's window %d: keeping the "
                     "last %d", values.shape[1], n, n)
            values = values[:, -n:]
        kept = values.shape[1]
        self.window.fill_(torch.nan)
        self.window[:, (learned - kept + torch.arange(kept, device=self.device)) % n] = values.to(self.device)
        self.learned.fill_(learned)


def _level(values: torch.Tensor) -> torch.Tensor:
    """The level of each row (or window) of learned values, over the last dimension: see LEVEL_STEPS."""
    return torch.stack([values[..., -k:].nanmedian(dim=-1).values for k in LEVEL_STEPS]).min(dim=0).values


def _judged_scale(values: torch.Tensor) -> torch.Tensor:
    """Rows (loss, grad norm) on the scale they are judged on: the loss as is, the log of the grad norm."""
    return torch.stack([values[0], values[1].clamp_min(1e-30).log()])


def _found_inf_per_device(scaler: Any, optimizer: Any) -> dict[Any, torch.Tensor]:
    """The GradScaler's per-device found_inf flags of ``optimizer`` (set by ``unscale_``)."""
    return scaler._per_optimizer_states[id(getattr(optimizer, "optimizer", optimizer))]["found_inf_per_device"]


def _first(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, comma-separated (", ..." when there are more)."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
