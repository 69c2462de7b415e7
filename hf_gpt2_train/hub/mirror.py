"""Mirror a run to the Hub while it trains (``--push_to_hub --hub_strategy``), and ``--resume_from_checkpoint hub``.

Strategies, with transformers Trainer's meanings:

* ``end``: nothing while training; the final export is pushed after training (``push.py``).
* ``every_save``: after each save, the export of that checkpoint (model, tokenizer, card) at the repo root.
* ``checkpoint``: the same plus the checkpoint itself, optimizer state included, in ``last-checkpoint/``: enough
  to continue the run on a fresh machine with ``--resume_from_checkpoint hub --hub_model_id ID``.
* ``all_checkpoints``: the same, with every checkpoint kept in its own folder ``step_NNNNNNN/``.

Training never waits for the Hub. ``saved`` (called on the checkpoint writer thread once a save is in place)
only hard-links the checkpoint into ``OUTPUT_DIR/.hub-mirror/`` (its tier may rotate away while it uploads) and
returns; one daemon thread uploads, at most one upload is in flight, and a save arriving meanwhile replaces any
older one still waiting (the newest wins). Each upload is one commit. A failed upload is a warning; the next
save retries with newer state. The export is built on that thread too (its tensor work releases the GIL; the
card's plot is the only sizeable Python work). The final save's export is left to the end-of-run push; ``finish`` (called before it) waits for the upload in flight and what is still waiting.

Never uploaded: tokens (they travel only in the Authorization header) and local paths: the mirrored
manifest's path settings are reduced to folder names and its secrets blanked.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_gpt2_train.checkpoint.tiers import step_name
from hf_gpt2_train.config import Config, ConfigError

log = logging.getLogger(__name__)

MIRROR_DIR = ".hub-mirror"
LAST_CHECKPOINT = "last-checkpoint"
PATH_KEYS = {"output_dir", "data_dir", "tokenizer_file", "hellaswag_path", "resume_from_checkpoint", "resumed_from",
             "path", "logging_dir", "project_dir"}


def public_manifest(manifest: Any) -> Any:
    """``manifest`` with its secrets redacted (``redact.py``) and every local path reduced to its last component."""
    from hf_gpt2_train.redact import redact_secrets

    return _paths_to_names(redact_secrets(manifest))


def _paths_to_names(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: Path(v).name if isinstance(v, str) and v and (k in PATH_KEYS or os.path.isabs(v))
                else _paths_to_names(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_paths_to_names(v) for v in obj]
    return obj


@dataclass
class _Upload:
    step: int
    staging: Path  # .hub-mirror/step_N-<n>/ : checkpoints/<tier>/ (hard links), run_info + metrics copies, export/
    tier: str
    export: bool
    checkpoint_in_repo: str | None  # last-checkpoint, step_NNNNNNN, or None


class HubMirror:
    """Background Hub uploads of a run's saves (main process), and the download for ``resume ... hub``."""

    def __init__(self, cfg: Config, output_dir: str | Path, is_main: bool = True):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        h = cfg.hub
        self.repo_id, self.strategy, self.private = h.hub_model_id, h.hub_strategy, h.hub_private
        self._token = h.hub_token or None
        self.uploads = bool(is_main and h.push_to_hub and h.hub_model_id and h.hub_strategy != "end")
        self._cond = threading.Condition()
        self._pending: _Upload | None = None
        self._busy: _Upload | None = None
        self._thread: threading.Thread | None = None
        self._repo_ready = False
        self._seq = 0
        self.pushed: list[int] = []  # steps whose upload succeeded (for the log and tests)

    # ------------------------------------------------------------------------------------- while training
    def saved(self, folder: Path, manifest: dict[str, Any]) -> None:
        """A checkpoint is in place at ``folder``: queue its upload (never blocks on the network)."""
        if not self.uploads:
            return
        step, tiers = int(manifest["step"]), list(manifest.get("tiers") or [folder.name])
        export = "final" not in tiers  # the end-of-run push exports the final model
        in_repo = {"checkpoint": LAST_CHECKPOINT, "all_checkpoints": step_name(step)}.get(self.strategy)
        if not export and in_repo is None:
            return
        try:
            job = self._stage(folder, manifest, step, export, in_repo)
        except OSError as e:
            log.warning("hub: could not prepare the upload of step %d (%s); the next save retries", step, e)
            return
        with self._cond:
            if self._pending is not None:
                log.info("hub: step %d supersedes step %d, which was still waiting to upload", step,
                         self._pending.step)
                shutil.rmtree(self._pending.staging, ignore_errors=True)
            self._pending = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hub-mirror", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def finish(self, wait: bool = True) -> None:
        """End of training: wait for the upload in flight and the one waiting (``wait=False``: a stop by signal,
        which must exit quickly, leaves them; the Hub keeps the last mirrored state)."""
        if not self.uploads or self._thread is None:
            return
        with self._cond:
            outstanding = [j.step for j in (self._busy, self._pending) if j is not None]
            if outstanding and not wait:
                log.warning("hub: not waiting for the upload of step(s) %s (stopped by a signal)", outstanding)
                return
            t0 = time.monotonic()
            while self._busy is not None or self._pending is not None:
                waiting = [j.step for j in (self._busy, self._pending) if j is not None]
                log.info("hub: waiting for the upload of step(s) %s to %s%s", waiting, self.repo_id,
                         f" ({time.monotonic() - t0:.0f}s so far)" if time.monotonic() - t0 > 1 else "")
                self._cond.wait(timeout=60)

    def _stage(self, folder: Path, manifest: dict[str, Any], step: int, export: bool,
               in_repo: str | None) -> _Upload:
        from hf_gpt2_train.checkpoint import atomic

        if self._seq == 0:  # snapshots a killed run left behind (hard links that would pin rotated checkpoints)
            shutil.rmtree(self.output_dir / MIRROR_DIR, ignore_errors=True)
        self._seq += 1
        staging = self.output_dir / MIRROR_DIR / f"{step_name(step)}-{self._seq}"
        shutil.rmtree(staging, ignore_errors=True)
        tier = manifest.get("tier") or folder.name
        ckpt = staging / "checkpoints" / tier
        ckpt.parent.mkdir(parents=True)
        atomic.link_tree(folder, ckpt, public_manifest(manifest))
        for name in ("run_info.json", "metrics.jsonl"):  # the export's card reads them next to checkpoints/
            if (self.output_dir / name).is_file():
                shutil.copy2(self.output_dir / name, staging / name)
        return _Upload(step, staging, tier, export, in_repo)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                job, self._pending, self._busy = self._pending, None, self._pending
            try:
                self._upload(job)
            except Exception as e:  # the Hub is slow, down or refuses: training goes on, the next save retries
                log.warning("hub: could not push step %d to %s (%s: %s); training continues and the next save "
                            "retries", job.step, self.repo_id, type(e).__name__, str(e).splitlines()[0][:300]
                            if str(e) else "")
            finally:
                shutil.rmtree(job.staging, ignore_errors=True)
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _upload(self, job: _Upload) -> None:
        from huggingface_hub import CommitOperationAdd, HfApi

        t0 = time.perf_counter()
        ops: list[Any] = []
        if job.export:
            export_dir = self._export(job)
            ops += [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                    for p in sorted(export_dir.iterdir()) if p.is_file()]
        if job.checkpoint_in_repo:
            ckpt = job.staging / "checkpoints" / job.tier
            ops += [CommitOperationAdd(path_in_repo=f"{job.checkpoint_in_repo}/{p.relative_to(ckpt).as_posix()}",
                                       path_or_fileobj=str(p)) for p in sorted(ckpt.rglob("*")) if p.is_file()]
        api = HfApi(token=self._token)
        if not self._repo_ready:
            api.create_repo(self.repo_id, private=True if self.private else None, exist_ok=True, repo_type="model")
            self._repo_ready = True
        what = " + ".join(x for x in ("export" if job.export else "", job.checkpoint_in_repo and
                                      f"{job.checkpoint_in_repo}/") if x)
        api.create_commit(self.repo_id, operations=ops, repo_type="model",
                          commit_message=f"Training in progress, step {job.step}" +
                          (", checkpoint" if job.checkpoint_in_repo else ""))
        self.pushed.append(job.step)
        log.info("hub: pushed step %d (%s) to %s in %.1fs", job.step, what, self.repo_id, time.perf_counter() - t0)

    def _export(self, job: _Upload) -> Path:
        """The export of the staged checkpoint (``hf-gpt2-train export``: stock GPT-2, tokenizer, model card)."""
        from transformers.utils import logging as hf_logging

        from hf_gpt2_train.hub.export import export_hf

        out = job.staging / "export"
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the training log
        try:
            export_hf(job.staging / "checkpoints" / job.tier, out, tokenizer_file=self.cfg.data.tokenizer_file,
                      repo_id=self.repo_id)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return out

    # --------------------------------------------------------------------------------- resume from the Hub
    def download(self, root: Path) -> Path:
        """Download the repo's ``last-checkpoint/`` (else its newest ``step_NNNNNNN/``) into ``root`` as the
        rolling checkpoint of its step, verified; returns that folder. Bad input or a damaged download:
        ConfigError naming the fix."""
        from huggingface_hub import HfApi, constants, snapshot_download

        from hf_gpt2_train.checkpoint import atomic
        from hf_gpt2_train.hub.push import _is_network_error

        if constants.is_offline_mode():
            raise ConfigError("--resume_from_checkpoint hub: HF_HUB_OFFLINE is set: unset it, or resume from a local "
                              "checkpoint")
        api = HfApi(token=self._token)
        try:
            files = api.list_repo_files(self.repo_id, repo_type="model")
            prefix = _checkpoint_prefix(files)
            if prefix is None:
                raise ConfigError(f"--resume_from_checkpoint hub: {self.repo_id} holds no {LAST_CHECKPOINT}/ (push "
                                  "with --push_to_hub --hub_strategy checkpoint), or resume from a local checkpoint")
            tmp = root / ".hub-download"
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            snapshot_download(self.repo_id, repo_type="model", allow_patterns=[f"{prefix}/*", f"{prefix}/**"],
                              local_dir=str(tmp), token=self._token)
        except ConfigError:
            raise
        except Exception as e:
            if not (_is_network_error(e) or type(e).__module__.startswith("huggingface_hub")):
                raise
            raise ConfigError(f"--resume_from_checkpoint hub: cannot read {self.repo_id} from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): check "
                              "--hub_model_id, the token and the network") from None
        src = tmp / prefix
        shutil.rmtree(src / ".cache", ignore_errors=True)
        v = atomic.verify(src, hashes=True)
        if not v.ok:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"--resume_from_checkpoint hub: {self.repo_id}/{prefix} is not a complete checkpoint "
                              f"({v.reason}): push a new one, or resume from a local checkpoint")
        step = int(v.manifest["step"])
        target = root / step_name(step)
        log.info("downloaded %s/%s (step %d, %.1f MB) in %.1fs", self.repo_id, prefix, step,
                 atomic.folder_bytes(src) / 1e6, time.perf_counter() - t0)
        same = atomic.verify(target, hashes=False)
        if same.ok and same.manifest.get("save_id") == v.manifest.get("save_id"):
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        new = root / f".new-{target.name}"
        atomic.remove_tree(new)
        os.rename(src, new)
        atomic.swap_in(new, target)
        shutil.rmtree(tmp, ignore_errors=True)
        return target


def _checkpoint_prefix(files: list[str]) -> str | None:
    if any(f.startswith(f"{LAST_CHECKPOINT}/") for f in files):
        return LAST_CHECKPOINT
    steps = sorted({f.split("/", 1)[0] for f in files if f.startswith("step_") and "/" in f
                    and f.endswith("/manifest.json")})
    return steps[-1] if steps else None
