"""The update guard: skip, on the device, an optimizer update whose loss or grad norm is non-finite or an outlier.

Each step's (loss, grad norm) is compared with a running window of the last ``outlier_window`` *accepted*
steps: ``z = (x - mean) / std`` per quantity (one-sided: only values above the baseline count), as llm.c's
``-sl``/``-sg`` do. The update is skipped when either value is non-finite or, once the window is full, when a
z-score exceeds its threshold. Skipped steps stay out of the window, so a stretch of bad data cannot drag
the baseline up and hide itself. The decision is a device tensor handed to fused AdamW as ``found_inf``
(the same mechanism a GradScaler uses), so the host never waits for the device on non-logged steps; every
step's numbers are written into a small device buffer that the logging step reads in one copy.

The loss is the mean over all processes (one scalar all-reduce per step, asynchronous on NCCL) and the grad
norm is the global one, so every rank takes the same decision on the same numbers.

With a GradScaler (fp16) an inf/NaN gradient is the scaler's normal overflow signal: the scaler skips that
update and lowers its scale by itself, so it is counted as a scaler overflow, never as non-finite (only a
non-finite *loss* is). An outlier skip is injected into the scaler's own ``found_inf`` and the scale it
would have lost is restored, so for the scaler that step never happened.

The window is part of the trainer state in every checkpoint (``TrainerState.attach``), so a resumed run
takes exactly the decisions of an uninterrupted one.
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

# Bits of a step's flags (a float in the record buffer; exact for these small integers).
NONFINITE, LOSS_OUTLIER, GRAD_OUTLIER, SCALER_OVERFLOW, LOSS_HIGH = 1, 2, 4, 8, 16
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
        return f"{self.step} ({', '.join(why)})"


@dataclass
class GuardReport:
    """The steps since the previous logging step."""

    records: list[StepRecord]

    @property
    def skipped(self) -> list[StepRecord]:
        return [r for r in self.records if r.skipped]

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
        self.window = torch.zeros(2, n, device=device)
        """Last ``n`` accepted (loss, grad norm) pairs, a ring buffer indexed by ``accepted % n``."""
        self.accepted = torch.zeros((), dtype=torch.long, device=device)
        """Updates accepted into the window so far (the z-scores are active once it reaches ``n``)."""
        self.thresholds = torch.tensor([cfg.loss_z_threshold, cfg.grad_norm_z_threshold], device=device)
        self.outliers_on = cfg.skip_outlier_updates
        self._buffer = torch.zeros(max(1, capacity), 5, device=device)
        self._pending: list[tuple[int, tuple[int, int]]] = []

    # ------------------------------------------------------------------------------------ every step
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
        mean, std = self.window.mean(dim=1), self.window.std(dim=1)
        ready = self.accepted >= self.window.shape[1]
        # A floor on the spread: a window of near-identical values must not turn rounding noise into outliers.
        z = torch.where(ready, (values - mean) / torch.maximum(std, 1e-3 * mean.abs() + 1e-12), torch.nan)
        high = ready & finite.all() & ~overflow & (z > self.thresholds)
        outlier = high.any() if self.outliers_on else torch.zeros_like(ready)
        skip = nonfinite | outlier
        accept = ~skip & ~overflow & finite.all()
        slot = (self.accepted % self.window.shape[1]).reshape(1)
        self.window.index_copy_(1, slot, torch.where(accept, values, self.window.index_select(1, slot)[:, 0])[:, None])
        self.accepted += accept.long()
        loss_high = ready & finite[0] & (z[0] > self.cfg.spike_z_threshold)
        flags = (nonfinite.float() * NONFINITE + (outlier & high[0]).float() * LOSS_OUTLIER
                 + (outlier & high[1]).float() * GRAD_OUTLIER + overflow.float() * SCALER_OVERFLOW
                 + loss_high.float() * LOSS_HIGH)
        i = len(self._pending)
        if i == self._buffer.shape[0]:  # more steps between logging steps than expected: grow (rare)
            self._buffer = torch.cat([self._buffer, torch.zeros_like(self._buffer)])
        self._buffer[i] = torch.stack([values[0], values[1], z[0], z[1], flags])
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
        records = [StepRecord(step, data, *row[:4], int(row[4])) for (step, data), row in zip(self._pending, rows,
                                                                                           strict=True)]
        self._pending.clear()
        report = GuardReport(records)
        bad = report.nonfinite
        if bad:
            msg = (f"non-finite loss or grad norm in {len(bad)} step(s) up to step {records[-1].step} "
                   f"(steps {_first([str(r.step) for r in bad])}); those updates were skipped, weights are from the last finite step")
            if self.on_nonfinite == "stop":
                raise NonFiniteLossError(f"{msg}: lower --learning_rate, check the data, or pass --on_nonfinite skip")
        skipped = report.skipped
        if skipped:
            log.warning("update guard: skipped %d update(s): step %s", len(skipped),
                        _first([r.describe() for r in skipped]))
        return report

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain lists (exact for float32), so the trainer state stays comparable and picklable."""
        return {"window": self.window.cpu().tolist(), "accepted": int(self.accepted.item())}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        window = torch.tensor(d["window"], dtype=self.window.dtype)
        if window.shape != self.window.shape:
            log.warning("update guard: the checkpoint's window holds %d steps, this run uses %d: starting a new "
                        "window (outlier checks resume once it is full)", window.shape[-1], self.window.shape[1])
            self.window.zero_()
            self.accepted.zero_()
            return
        self.window.copy_(window)
        self.accepted.fill_(int(d["accepted"]))


def _found_inf_per_device(scaler: Any, optimizer: Any) -> dict[Any, torch.Tensor]:
    """The GradScaler's per-device found_inf flags of ``optimizer`` (set by ``unscale_``)."""
    return scaler._per_optimizer_states[id(getattr(optimizer, "optimizer", optimizer))]["found_inf_per_device"]


def _first(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, comma-separated (", ..." when there are more)."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
