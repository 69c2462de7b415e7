"""CheckpointManager: tiers, rotation, retention and resume on top of ``accelerator.save_state``.

Tiers under ``OUTPUT_DIR/checkpoints/``:

* ``latest`` every ``checkpoint_steps`` / ``checkpoint_minutes`` (and on graceful shutdown and at the end);
  the previous ``latest`` becomes ``latest_backup``.
* ``step_NNNNNNN`` at every ``checkpoint_steps``; the ``keep_last`` most recently saved are kept.
* ``best`` whenever ``val_loss`` improves; ``milestone_NNNNNNN`` every ``milestone_steps`` and at each
  epoch end (never deleted); ``final`` at the end of training.

One save that belongs to several tiers is written once and hard-linked into each tier folder (see
``atomic.py`` for the on-disk protocol that makes every step crash-safe, ``tiers.py`` for the folder
operations). Retention never deletes ``best``, a milestone, ``final`` or the checkpoint this run resumed from:
resuming from a tier that rotates (``latest``, ``latest_backup``, ``best``, ``final``) first hard-links it as
``step_NNNNNNN`` (no extra disk) and that folder is kept for the rest of the run.

Saves are asynchronous on a GPU and synchronous on CPU by default (``--async_checkpoint``, chosen by
``writer.choose_background_saves``). An asynchronous save pauses the loop only while ``snapshot.py`` copies
the state to host memory and writes the small files, then ``writer.py``'s thread writes model and optimizer,
seals and promotes. The next save waits for the one in flight; the ``final`` save and the save on a stop
signal are durable when ``maybe_save`` returns. A failed background write raises ``CheckpointSaveError`` at
the next save (or the end of the run) on every rank.

Multi-process runs: every rank writes its own ``random_states_<rank>.pkl`` into the same temp folder, so
``OUTPUT_DIR`` must be on a filesystem all nodes share (as for any Accelerate multi-node checkpoint; checked at
start by ``outdir.shared_folder_problem``).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hf_gpt2_train import package_versions
from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.checkpoint.atomic import MANIFEST, TMP_SAVE, CheckpointInvalid
from hf_gpt2_train.checkpoint.snapshot import StateCapture, fsdp_resume_problem
from hf_gpt2_train.checkpoint.sync import LaggedAnyFlag, any_rank, broadcast_from_main, distributed
from hf_gpt2_train.checkpoint.tiers import TierStore, milestone_name, rolling, step_name
from hf_gpt2_train.checkpoint.writer import BackgroundWriter, choose_background_saves
from hf_gpt2_train.config import CheckpointConfig, ConfigError
from hf_gpt2_train.errors import CheckpointSaveError
from hf_gpt2_train.state import TrainerState

logger = logging.getLogger("hf_gpt2_train.checkpoint")

# Model fields whose change makes a checkpoint unloadable (dropout etc. may change on resume).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "pad_vocab_multiple")


class _DropTiedWeightNotice(logging.Filter):
    """Accelerate warns on every save that it dropped the tied ``lm_head.weight``: expected for GPT-2 (it is
    the embedding, restored by weight tying on load), so the notice is dropped instead of repeated."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _save_error_reason(err: BaseException, root: Path) -> str:
    """What a failed save tells the user. torch.save reports a full disk as "unexpected pos ..." from its zip
    writer: say what it is. Free space is read before the half-written save is removed, which frees it again."""
    reason = f"{type(err).__name__}: {err}"
    if not isinstance(err, OSError) and _free_bytes(root) < 1 << 20:
        reason = f"No space left on device ({reason})"
    return reason


@dataclass
class _LastSave:
    """What the previous save wrote, so a second call at the same step links instead of writing again."""

    step: int
    key: dict[str, Any]
    manifest: dict[str, Any]
    folders: list[str] = field(default_factory=list)


class CheckpointManager:
    """Decides which tiers are due, saves crash-safely, rotates, and resolves/loads resumes.

    Every method is called on all ranks; only the main process touches files, and ranks agree through
    tiny CPU all-reduces (only when saving or resuming).
    """

    def __init__(self, accelerator: Any, cfg: CheckpointConfig, output_dir: str | Path, run_info: dict[str, Any],
                 hub: Any = None):
        """``hub``: an object with ``saved(folder, manifest)`` (told of every save once it is in place, on the
        main process) and ``download(root)`` (for ``--resume_from_checkpoint hub``): ``hub.mirror.HubMirror``."""
        self.accelerator = accelerator
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.run_info = run_info
        self.hub = hub
        self.is_main = bool(accelerator.is_main_process)
        self.tiers = TierStore(self.root, cfg.keep_last)
        self.capture = StateCapture(accelerator)
        self.writer = BackgroundWriter()
        self.background, self.save_mode = choose_background_saves(cfg.async_checkpoint, accelerator.device.type)
        run_info["async_checkpoint"] = {"enabled": self.background, "reason": self.save_mode}
        self._in_flight: int | None = None  # step of the save being written in the background (every rank)
        self._fallbacks: dict[str, list[Path]] = {}
        self._last: _LastSave | None = None
        self._last_latest_time = time.monotonic()
        self._time_flag = LaggedAnyFlag()
        noisy = logging.getLogger("accelerate.utils.other")
        if not any(isinstance(f, _DropTiedWeightNotice) for f in noisy.filters):
            noisy.addFilter(_DropTiedWeightNotice())

    # ------------------------------------------------------------------------------------------ resume
    def resolve_resume(self, spec: str | None) -> Path | None:
        """Which checkpoint ``--resume_from_checkpoint spec`` means (None: start fresh).

        ``latest``/``auto`` fall back from a damaged or incomplete ``latest`` to ``latest_backup`` and then to
        the most recent valid rolling checkpoint, warning about each one skipped. Sizes are checked here;
        checksums are checked by ``load`` while the state loads.
        """
        if not spec or not str(spec).strip():
            return None
        result: tuple[str | None, list[str], str | None] = (None, [], None)
        if self.is_main:
            try:
                if str(spec).strip().lower() == "hub":  # download last-checkpoint/ into this run's tiers
                    if self.hub is None:
                        raise ConfigError("--resume_from_checkpoint hub needs --hub_model_id USER/NAME")
                    spec = str(self.hub.download(self.root))
                result = self._resolve_main(str(spec).strip())
            except ConfigError as e:
                result = (None, [], str(e))
            except OSError as e:  # every rank must hear about it, or the others wait forever
                result = (None, [], f"cannot read the checkpoints in {self.root} ({e}): check the folder")
        path, fallbacks, error = broadcast_from_main(result)
        if error:
            raise ConfigError(error)
        if path is None:
            return None
        self._fallbacks[path] = [Path(f) for f in fallbacks]
        return Path(path)

    def _chain(self, root: Path) -> list[Path]:
        """latest, latest_backup, then rolling checkpoints, most recently saved first."""
        return [root / "latest", root / "latest_backup", *reversed(rolling(root))]

    def _resolve_main(self, spec: str) -> tuple[str | None, list[str], str | None]:
        for action in atomic.recover(self.root):
            logger.warning("checkpoints: %s", action)
        key = spec.lower()
        if key in ("latest", "auto"):
            chain = [p for p in self._chain(self.root) if p.exists()]
            if not chain:
                if key == "auto":
                    logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting fresh", self.root)
                    return None, [], None
                raise ConfigError(f"--resume_from_checkpoint latest: {self.root} holds no checkpoint: start "
                                  "fresh without it (or pass auto), or point --output_dir at the run to resume")
        elif key in ("best", "backup"):
            name = "best" if key == "best" else "latest_backup"
            chain = [self.root / name]
            if not chain[0].exists():
                raise ConfigError(f"--resume_from_checkpoint {spec}: there is no {self.root / name}: pass latest "
                                  "or a checkpoint path (see `hf-gpt2-train checkpoints list OUTPUT_DIR`)")
        else:
            p = Path(spec).expanduser()
            if not p.exists() and (self.root / spec).exists():
                p = self.root / spec  # a tier name such as final or step_0000500
            if not p.exists():
                raise ConfigError(f"--resume_from_checkpoint {spec}: no such checkpoint folder: pass latest, best, "
                                  "backup, auto or an existing checkpoint path")
            if not (p / MANIFEST).exists() and (p / "checkpoints").is_dir():
                chain = [c for c in self._chain(p / "checkpoints") if c.exists()]  # an output dir: its latest
            else:
                chain = [p]
        skipped: list[str] = []
        for i, cand in enumerate(chain):
            v = atomic.verify(cand, hashes=False)
            if v.ok:
                if skipped:
                    logger.warning("resume: skipped %s; using %s (step %s)", "; ".join(skipped), cand,
                                   v.manifest.get("step"))
                rest = chain[i + 1:] if len(chain) > 1 else []
                return str(cand), [str(r) for r in rest], None
            skipped.append(f"{cand.name} ({v.reason})")
        raise ConfigError(f"no valid checkpoint to resume from ({'; '.join(skipped)}): restore the folder, pass "
                          "another --resume_from_checkpoint, or start a new --output_dir")

    def _check_shape(self, manifest: dict[str, Any], path: Path) -> None:
        ours = (self.run_info.get("config") or {}).get("model")
        theirs = (manifest.get("config") or {}).get("model")
        if not ours or not theirs:
            return
        diff = [f"{k}={theirs.get(k)} (this run: {ours.get(k)})" for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
        if diff:
            raise ConfigError(f"checkpoint {path} holds another model shape: {', '.join(diff)}: resume with the "
                              "run's own --preset/--config (see its run_info.json) or start a new --output_dir")

    def load(self, path: str | Path) -> dict[str, Any]:
        """``accelerator.load_state`` from ``path`` on all ranks; returns its manifest (with ``"path"``).

        The checksum check (``verify_checkpoint``) runs in a thread while the state loads. If it fails for a
        checkpoint chosen by ``latest``/``auto``, the next candidate of the fallback chain is loaded instead
        (with a warning); ``manifest["path"]`` says which one was loaded.
        """
        path = Path(path)
        candidates = [path, *self._fallbacks.get(str(path), [])]
        for i, cand in enumerate(candidates):
            manifest, reason = self._load_one(cand)
            if reason is None:
                logger.info("resumed from %s (step %s, %s tokens)", cand, manifest.get("step"),
                            f"{manifest.get('tokens_seen', 0):,}")
                self._after_load(cand, manifest)
                return {**manifest, "path": str(cand)}
            if i + 1 < len(candidates):
                logger.warning("resume: %s failed verification (%s); falling back to %s", cand, reason,
                               candidates[i + 1])
            else:
                raise ConfigError(f"checkpoint {cand} cannot be resumed: {reason}: pass another "
                                  "--resume_from_checkpoint (see `hf-gpt2-train checkpoints list`)")
        raise AssertionError("unreachable")

    def _load_one(self, cand: Path) -> tuple[dict[str, Any], str | None]:
        info: tuple[dict[str, Any], str | None] = ({}, None)
        if self.is_main:
            try:
                m = atomic.read_manifest(cand)
                atomic.check_sizes(cand, m)
                info = (m, None)
            except CheckpointInvalid as e:
                info = ({}, str(e))
        manifest, reason = broadcast_from_main(info)
        if reason is not None:
            return manifest, reason
        self._check_shape(manifest, cand)
        from hf_gpt2_train.optim import optimizer_mismatch

        if problem := optimizer_mismatch(manifest.get("config"), self.run_info.get("config")):
            raise ConfigError(f"checkpoint {cand} cannot be resumed: {problem}")
        if problem := fsdp_resume_problem(cand, self.capture.mode):
            raise ConfigError(f"checkpoint {cand} cannot be resumed under this FSDP configuration: {problem}. Resume "
                              "it with the fsdp_state_dict_type it was saved with, or without FSDP (DDP or one "
                              "process read its model.safetensors and optimizer.bin)")

        import threading

        hash_error: list[str] = []

        def _hash() -> None:
            try:
                atomic.check_hashes(cand, manifest)
            except CheckpointInvalid as e:
                hash_error.append(str(e))

        hasher = threading.Thread(target=_hash, daemon=True) if self.is_main and self.cfg.verify_checkpoint else None
        if hasher is not None:
            hasher.start()
        load_error: BaseException | None = None
        try:
            # TransformerEngine layers carry fp8 metadata as extra `*._extra_state` keys, so a checkpoint moving
            # between a TE run and a non-TE run loads non-strictly; the manifest shape check above already
            # guarantees every weight matches.
            te = "fp8-te" in (manifest.get("effective_precision"), self.run_info.get("effective_precision"))
            self.accelerator.load_state(str(cand), strict=not te)
        except ConfigError:
            raise  # e.g. the loader refusing another data set: the same on every rank, not damage
        except Exception as e:  # a corrupt file that still has the right size, or a shape mismatch
            load_error = e
        # load_state restores Accelerate's micro-step counter, which decides at which micro-step gradients
        # sync and the optimizer really steps. It counts micro-steps of the *saved* run; with another world
        # size the accumulation count differs and an odd counter would skip every optimizer step. We always
        # save at an optimizer-step boundary, where the counter is 0 modulo accumulation: restart it there.
        self.accelerator.step = 0
        if hasher is not None:
            hasher.join()
        if load_error is not None and "size mismatch" in str(load_error):
            raise ConfigError(f"checkpoint {cand} holds another model shape than this run builds: resume with the "
                              "run's own --preset/--config or start a new --output_dir") from None
        failed = any_rank(load_error is not None)
        main_reason = broadcast_from_main(hash_error[0] if hash_error else
                                          (f"{type(load_error).__name__}: {load_error}" if load_error else None))
        if failed or main_reason:
            return manifest, main_reason or "it could not be loaded on another process"
        return manifest, None

    def _after_load(self, cand: Path, manifest: dict[str, Any]) -> None:
        """Keep the checkpoint we resumed from for the whole run (hard-link it as a rolling folder if it rotates)."""
        self._last, self._last_latest_time = None, time.monotonic()
        if self.is_main:
            self.tiers.keep_as_rolling(cand, manifest)

    # -------------------------------------------------------------------------------------------- save
    def maybe_save(self, state: TrainerState, *, val_loss: float | None = None, epoch_ended: bool = False,
                   final: bool = False, force_latest: bool = False) -> Path | None:
        """Save the tiers due at ``state.step`` (call on all ranks after every optimizer step).

        ``val_loss`` must be the same on every rank (the reduced value). A lower ``val_loss`` updates
        ``state.best_val_loss`` before saving, so the saved trainer state is consistent. Returns the folder
        of the first tier written, or None when nothing was due. Raises CheckpointSaveError if writing fails.
        """
        c, step = self.cfg, state.step
        scheduled = c.checkpoint_steps > 0 and step > 0 and step % c.checkpoint_steps == 0
        latest_due = force_latest or final or scheduled
        if c.checkpoint_minutes > 0:
            elapsed_due = time.monotonic() - self._last_latest_time >= 60 * c.checkpoint_minutes
            # Ranks' clocks differ: they agree through a background all-reduce, one step late.
            latest_due |= self._time_flag.collect() if distributed() else elapsed_due
        tiers: list[str] = ["latest"] if latest_due else []
        if scheduled:
            tiers.append(step_name(step))
        if val_loss is not None and math.isfinite(val_loss) and val_loss < state.best_val_loss:
            state.best_val_loss = float(val_loss)
            tiers.append("best")
        if (c.milestone_steps > 0 and step > 0 and step % c.milestone_steps == 0) or epoch_ended:
            tiers.append(milestone_name(step))
        if final:
            tiers.append("final")
        durable = final or force_latest or not self.background  # the last save of a run must be on disk
        saved = self._save(state, tiers, val_loss, durable) if tiers else None
        if c.checkpoint_minutes > 0 and distributed():
            self._time_flag.start(time.monotonic() - self._last_latest_time >= 60 * c.checkpoint_minutes)
        return saved

    def _state_key(self, state: TrainerState) -> dict[str, Any]:
        d = state.state_dict()
        d.pop("wall_time", None)
        return d

    def _save(self, state: TrainerState, tiers: list[str], val_loss: float | None, durable: bool) -> Path:
        key = self._state_key(state)
        if durable and self._in_flight is not None and self.writer.running:
            logger.info("finishing the background write of the checkpoint of step %d first", self._in_flight)
        self.wait()  # the save in flight first: its buffers are reused, its tiers may be linked below
        last = self._last
        if last is not None and last.step == state.step and last.key == key:
            # Same step, same state (e.g. `final` right after the scheduled save): link, do not write again.
            todo = [t for t in tiers if t not in last.folders]
            if todo:
                self._run_main(state.step, lambda: self.tiers.link_more(last.step, last.folders, last.manifest, todo))
                last.folders += todo
            if "latest" in tiers:
                self._last_latest_time = time.monotonic()
            return self.root / (tiers[0] if tiers[0] in last.folders else last.folders[0])

        tmp = self.root / TMP_SAVE

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            for action in atomic.recover(self.root):
                logger.warning("checkpoints: %s", action)
            tmp.mkdir()

        self._run_main(state.step, prepare)
        t0 = time.perf_counter()
        err: BaseException | None = None
        try:  # every rank: its RNG file, and what it must write (all of it on main, its shards under FSDP)
            snap = self.capture.capture(tmp, copy=not durable)
        except Exception as e:  # ENOSPC/EFBIG/EACCES surface as OSError or as torch/safetensors errors
            err = e
        self._agree(state.step, err)  # also a barrier: every rank's small files are in tmp before sealing
        blocked = time.perf_counter() - t0
        manifest = self._manifest(state, tiers, val_loss)
        self._last = _LastSave(state.step, key, manifest, list(tiers))
        if "latest" in tiers:
            self._last_latest_time = time.monotonic()

        def write() -> None:
            started = time.perf_counter()
            self.capture.write(snap)
            if not self.is_main:
                return
            note = "" if durable else (f" in the background (training paused {blocked + self.capture.stage_wait_s:.2f}s"
                                       " to take the state)")
            manifest.update(self.tiers.promote(tmp, tiers, manifest, note, t0 if durable else started, snap.entries))
            if self.hub is not None:
                self.hub.saved(self.root / tiers[0], manifest)

        if self.is_main or self.capture.writes_on_every_rank:
            self.writer.submit(state.step, write, background=not durable)
        self._in_flight = state.step
        if durable:
            self.wait(expected=True)
        return self.root / tiers[0]

    def wait(self, expected: bool = False) -> None:
        """Block until the save in flight (if any) is on disk, on every rank; raise CheckpointSaveError if its
        background write failed. Every save calls it first (logging how long it had to wait, unless
        ``expected``); a durable save (``final``, on a stop signal) before returning."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        done = self.writer.wait()
        if done.waited_s >= 0.1 and not expected:
            logger.info("waited %.1fs for the checkpoint of step %d to finish writing (it took %.1fs in the "
                        "background)", done.waited_s, step, done.write_s)
        self._agree(step, done.error)

    def _run_main(self, step: int, fn: Any) -> None:
        """Run ``fn`` on the main process; every rank learns whether it failed."""
        err: BaseException | None = None
        if self.is_main:
            try:
                fn()
            except Exception as e:
                err = e
        self._agree(step, err)

    def _agree(self, step: int, err: BaseException | None) -> None:
        if not any_rank(err is not None):
            return
        reason = "" if err is None else _save_error_reason(err, self.root)  # before the cleanup frees space
        if self.is_main:
            try:  # leave nothing half-written behind; what was complete before stays as it was
                for p in self.root.iterdir() if self.root.is_dir() else []:
                    if p.name == TMP_SAVE or p.name.startswith(".new-"):
                        atomic.remove_tree(p)
            except OSError:
                pass
        if err is None:
            raise CheckpointSaveError(f"saving the checkpoint of step {step} failed on another process; "
                                      "earlier checkpoints are intact")
        kept = ", ".join(sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))) \
            if self.root.is_dir() else "none"
        raise CheckpointSaveError(
            f"could not save the checkpoint of step {step} in {self.root}: {reason}. Earlier "
            f"checkpoints are intact ({kept or 'none'}): free disk space or make the folder writable, then resume "
            "with --resume_from_checkpoint latest") from err

    def _manifest(self, state: TrainerState, tiers: list[str], val_loss: float | None) -> dict[str, Any]:
        now = time.time()
        acc = self.accelerator
        return {
            **self.run_info,
            "tier": tiers[0],
            "tiers": list(tiers),
            "save_id": uuid.uuid4().hex,
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch,
            "val_loss": _json_float(val_loss if val_loss is not None else state.last_val_loss),
            "val_loss_step": state.step if val_loss is not None else state.last_val_step,
            "best_val_loss": _json_float(state.best_val_loss),
            "wall_time": state.wall_time,
            "created": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "created_unix": now,
            "world_size": acc.num_processes,
            "effective_precision": self.run_info.get("effective_precision", acc.mixed_precision),
            "versions": self.run_info.get("versions") or package_versions(),
        }
