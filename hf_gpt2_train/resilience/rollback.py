"""Spike rollback: reload the last good checkpoint in-process, skip the data of the bad stretch, continue.

A *stretch* is a run of consecutive spiking steps: updates the guard skipped, or steps whose loss z-score
was above ``spike_z_threshold`` (the loss stays above its running baseline even though the update went in).
A stretch of at least ``rollback_after`` steps is rolled back once it ends (the first normal step after it:
until then the guard keeps outlier updates out of the weights, and waiting finds where the bad data ends),
or at once when it has lasted ``STRETCH_CAP`` times as long. Rolling back means, as PaLM did for its spikes:

1. wait for any checkpoint save in flight; pick the newest checkpoint saved *before* the stretch that
   belongs to this run's current history (not to a branch abandoned by an earlier rollback);
2. ``CheckpointManager.load`` it (model, optimizer, RNG, trainer state, data position, guard window);
3. tell the loader to never read the global sequences the stretch read (``TrainLoader.skip``); the range
   and the event go into the loader state and ``TrainerState.rollbacks``, and ``latest`` is saved at once,
   so a crash or a later resume never replays that data;
4. log the event to train.log and the trackers (``train/rollbacks``, text ``events/rollback``, at the step
   the run continues from).

At most ``max_rollbacks`` per run (the count lives in the trainer state, so it survives resumes); a stretch
after that stops the run with SpikeRollbackError (exit code 4). Decisions are taken at logging steps from
the guard's records, which are identical on every rank; the main process's decision is broadcast anyway.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_gpt2_train.config import ConfigError, ResilienceConfig
from hf_gpt2_train.errors import SpikeRollbackError
from hf_gpt2_train.resilience.guard import StepRecord

log = logging.getLogger("hf_gpt2_train")

STRETCH_CAP = 4
"""A stretch still going after STRETCH_CAP * rollback_after steps is rolled back without waiting for its end."""


@dataclass
class Stretch:
    first: StepRecord
    last: StepRecord
    steps: int
    skipped: int

    @property
    def data(self) -> tuple[int, int]:
        """Global training sequences ``[first, end)`` the stretch read."""
        return self.first.data[0], self.last.data[1]

    def describe(self) -> str:
        return (f"steps {self.first.step}-{self.last.step} ({self.steps} spiking steps, {self.skipped} updates "
                "skipped)")


class SpikeRollback:
    """Tracks stretches of spiking steps and rolls back; see the module docstring."""

    def __init__(self, cfg: ResilienceConfig, state: Any, loader: Any, checkpoints: Any, seq_len: int,
                 tokens_per_step: int = 0):
        self.cfg = cfg
        self.tokens_per_step = tokens_per_step
        self.state = state
        self.loader = loader
        self.checkpoints = checkpoints
        self.seq_len = seq_len
        self.enabled = cfg.rollback_after > 0 and cfg.max_rollbacks >= 0
        self._current: Stretch | None = None
        self.due: Stretch | None = None

    # ----------------------------------------------------------------------------------- bookkeeping
    def observe(self, records: list[StepRecord]) -> None:
        """Feed the records of a logging interval; sets ``due`` when a stretch calls for a rollback."""
        if not self.enabled:
            return
        cap = STRETCH_CAP * self.cfg.rollback_after
        for r in records:
            cur = self._current
            if r.spiking:
                if cur is None:
                    self._current = Stretch(r, r, 1, int(r.skipped))
                else:
                    cur.last, cur.steps, cur.skipped = r, cur.steps + 1, cur.skipped + int(r.skipped)
                if self._current.steps >= cap:
                    self.due, self._current = self._current, None
                    return
            elif cur is not None:
                self._current = None
                if cur.steps >= self.cfg.rollback_after:
                    self.due = cur
                    return
                log.info("spike of %s passed (shorter than --rollback_after %d: no rollback)", cur.describe(),
                         self.cfg.rollback_after)

    # -------------------------------------------------------------------------------------- rollback
    def roll_back(self, tracker: Any = None) -> bool:
        """Perform the due rollback (all ranks). Returns True if the run now continues from an earlier step."""
        from hf_gpt2_train.checkpoint.sync import any_rank, broadcast_from_main

        if not any_rank(self.due is not None):
            return False
        stretch, self.due = broadcast_from_main(self.due), None
        done = list(self.state.rollbacks)
        if len(done) >= self.cfg.max_rollbacks:
            raise SpikeRollbackError(
                f"loss spike at {stretch.describe()} after {len(done)} rollback(s), the limit (--max_rollbacks "
                f"{self.cfg.max_rollbacks}): check the training data around global sequences {stretch.data[0]:,}-"
                f"{stretch.data[1]:,}, lower --learning_rate, or raise --max_rollbacks")
        self.checkpoints.wait()  # an in-flight save must be complete before we choose and load one
        candidates = broadcast_from_main(self._candidates(stretch.first.step) if self.checkpoints.is_main else [])
        at_step = self.state.step
        skipped_before = list(self.loader.skipped)
        if not candidates:
            if not stretch.skipped:
                log.warning("spike at %s: no checkpoint from before step %d to roll back to; continuing",
                            stretch.describe(), stretch.first.step)
                return False
            return self._rewind(stretch, at_step, done, skipped_before, tracker)
        manifest = None
        for i, path in enumerate(candidates):
            try:
                manifest = self.checkpoints.load(path)
                break
            except ConfigError as e:
                if i + 1 == len(candidates):
                    raise
                log.warning("rollback: %s (trying the next older checkpoint)", e)
        assert manifest is not None
        # The checkpoint predates this rollback: restore what happened since in its place.
        event = self._record(stretch, at_step, done, skipped_before, manifest["path"])
        self._report(stretch, at_step, done, event, tracker, f"reloaded step {self.state.step} from {manifest['path']}")
        return True

    def _rewind(self, stretch: Stretch, at_step: int, done: list[dict[str, Any]],
                skipped_before: list[tuple[int, int]], tracker: Any) -> bool:
        """No checkpoint before the stretch: give its skipped updates back to the schedule instead of reloading.

        A skipped update leaves weights and optimizer state exactly as they were (fused AdamW's found_inf also
        undoes its step count), so the run continues ``stretch.skipped`` steps earlier with the weights it has:
        as after a rollback, it does ``max_steps`` updates and reads the data after the stretch. The updates the
        stretch did apply (spiking, below the skip threshold) stay in; a checkpoint, when there is one, removes
        those too.
        """
        self.state.step = at_step - stretch.skipped
        self.state.tokens_seen -= stretch.skipped * self.tokens_per_step
        event = self._record(stretch, at_step, done, skipped_before, None)  # the data was read: no resume reads it
        self._report(stretch, at_step, done, event, tracker,
                     f"no checkpoint from before step {stretch.first.step}, and the skipped updates left the weights "
                     f"untouched: continuing at step {self.state.step} with the same weights (the {stretch.skipped} "
                     "skipped updates are given back to the schedule)")
        return True

    def _report(self, stretch: Stretch, at_step: int, done: list[dict[str, Any]], event: dict[str, Any],
                tracker: Any, what_was_done: str) -> None:
        first, end = stretch.data
        self._announce(f"rollback {len(done) + 1}/{self.cfg.max_rollbacks} at step {at_step}: loss spike at "
                       f"{stretch.describe()}; {what_was_done}; the training data of the stretch is skipped: global "
                       f"sequences {first:,}-{end:,} ({event['skipped_tokens']:,} tokens"
                       f"{self._token_range(first, end)})", done, tracker)

    def _record(self, stretch: Stretch, at_step: int, done: list[dict[str, Any]],
                skipped_before: list[tuple[int, int]], checkpoint: str | None) -> dict[str, Any]:
        """The rollback event into the trainer state, the stretch's data range into the loader's skipped ones."""
        first, end = stretch.data
        event = {"at_step": at_step, "stretch": [stretch.first.step, stretch.last.step], "to_step": self.state.step,
                 "checkpoint": checkpoint, "skipped_sequences": [first, end],
                 "skipped_tokens": (end - first) * self.seq_len, "time": time.time(),
                 "reason": f"{stretch.steps} spiking steps, {stretch.skipped} updates skipped"}
        self.state.rollbacks = [*done, event]
        self.loader.skip([*skipped_before, (first, end)])
        return event

    def _announce(self, text: str, done: list[dict[str, Any]], tracker: Any) -> None:
        """Log the rollback, tell the trackers, and save ``latest`` at once."""
        log.warning(text)
        if tracker is not None:
            # At the step the run continues from: where the new history starts, and a point that a later resume
            # from this checkpoint keeps (resumes purge the curves after their step).
            tracker.log(self.state.step, {"train/rollbacks": len(done) + 1, "events/rollback": text})
            bar = getattr(tracker, "bar", None)
            if bar is not None:
                bar.n = self.state.step
                bar.refresh()
        # Persist the skip now: a crash before the next scheduled save must not replay the bad data.
        self.checkpoints.maybe_save(self.state, force_latest=True)

    def _token_range(self, first: int, end: int) -> str:
        n = self.loader.num_windows
        if self.loader.shuffle or first // n != (end - 1) // n:
            return ""
        return f" = tokens {first % n * self.seq_len:,}-{((end - 1) % n + 1) * self.seq_len:,} of the training split"

    def _candidates(self, first_bad_step: int) -> list[str]:
        """Checkpoints to roll back to, best first: saved before ``first_bad_step``, on the current history."""
        from hf_gpt2_train.checkpoint import atomic

        root = Path(self.checkpoints.root)
        found = []
        for p in sorted(root.iterdir()) if root.is_dir() else []:
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                m = atomic.read_manifest(p)
                atomic.check_sizes(p, m)
            except atomic.CheckpointInvalid:
                continue
            step, created = m.get("step"), float(m.get("created_unix", 0.0))
            if not isinstance(step, int) or step >= first_bad_step:
                continue
            # A checkpoint written before an earlier rollback, past the step that rollback returned to, belongs
            # to the abandoned branch.
            if any(created < e["time"] and step > e["to_step"] for e in self.state.rollbacks):
                continue
            found.append((step, created, str(p)))
        found.sort(reverse=True)
        return [p for _, _, p in found]
