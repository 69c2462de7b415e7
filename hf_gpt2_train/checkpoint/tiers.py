"""The tier folders on disk: seal a written save, put it in place as its tiers (hard links), rotate.

Only the main process calls these, on the writer thread for asynchronous saves (see ``atomic.py`` for the
crash-safe protocol every step of it follows). Retention never deletes ``best``, a milestone, ``final`` or a
folder in ``protected`` (the checkpoint this run resumed from).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.checkpoint.atomic import MANIFEST, CheckpointInvalid

logger = logging.getLogger("hf_gpt2_train.checkpoint")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def milestone_name(step: int) -> str:
    return f"milestone_{step:07d}"


def rolling(root: Path) -> list[Path]:
    """Rolling step_* folders, oldest save first (save time, not step: a resume from an earlier step leaves
    newer-numbered folders of the abandoned branch, which must age out first)."""
    def saved_at(p: Path) -> tuple[float, str]:
        try:
            return float(atomic.read_manifest(p).get("created_unix", 0.0)), p.name
        except CheckpointInvalid:
            return -1.0, p.name  # damaged or incomplete: the first to go
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=saved_at)


class TierStore:
    """Tier folders under ``root`` (``OUTPUT_DIR/checkpoints``)."""

    def __init__(self, root: Path, keep_last: int):
        self.root = root
        self.keep_last = keep_last
        self.protected: set[str] = set()

    def promote(self, tmp: Path, tiers: list[str], manifest: dict[str, Any], note: str = "",
                started: float | None = None, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Seal the written save in ``tmp`` and make it ``tiers`` (the first renamed, the others hard links);
        returns the manifest as written. ``started``: ``time.perf_counter()`` when the save began (for the log);
        ``known``: manifest entries of files already fsync'd and checksummed by their writer."""
        t0 = time.perf_counter() if started is None else started
        manifest = atomic.seal(tmp, manifest, known)
        primary = tiers[0]
        new = self.root / f".new-{primary}"
        os.rename(tmp, new)
        self._swap(new, primary)
        for tier in tiers[1:]:
            self._link_tier(self.root / primary, tier, manifest)
        self.retain()
        logger.info("saved checkpoint %s at step %d in %.1fs%s", "+".join(tiers), manifest["step"],
                    time.perf_counter() - t0, note)
        return manifest

    def link_more(self, step: int, folders: list[str], manifest: dict[str, Any], todo: list[str]) -> None:
        """Also keep the save of ``step`` (now in ``folders``) as the tiers ``todo``, through hard links."""
        src = next((self.root / f for f in folders if (self.root / f / MANIFEST).is_file()), None)
        if src is None:
            raise FileNotFoundError(f"the checkpoint of step {step} vanished from {self.root}")
        for tier in todo:
            self._link_tier(src, tier, {**manifest, "tiers": folders + todo})
        self.retain()
        logger.info("step %d: also kept as %s (hard links)", step, "+".join(todo))

    def keep_as_rolling(self, cand: Path, manifest: dict[str, Any]) -> None:
        """Keep the checkpoint a run resumed from for the whole run (hard-link it as a rolling folder if its
        tier rotates); folders outside ``root`` are never touched."""
        try:
            if cand.resolve().parent != self.root.resolve():
                return
        except OSError:
            return
        if cand.name.startswith("step_"):
            self.protected.add(cand.name)
            return
        if cand.name.startswith("milestone_") or not isinstance(manifest.get("step"), int):
            return
        name = step_name(manifest["step"])
        try:
            if not (self.root / name).exists():
                new = self.root / f".new-{name}"
                atomic.remove_tree(new)
                atomic.link_tree(cand, new, {**manifest, "tier": name})
                atomic.swap_in(new, self.root / name)
            self.protected.add(name)
        except OSError as e:
            logger.warning("could not keep a copy of the resumed checkpoint as %s (%s); rotation may delete it", name, e)

    def retain(self) -> None:
        folders = rolling(self.root)
        keep = {p.name for p in folders[-self.keep_last:]} | self.protected
        for p in folders:
            if p.name not in keep:
                atomic.remove_tree(p)
                logger.info("rotated out %s (keep_last=%d)", p.name, self.keep_last)

    def _swap(self, new: Path, tier: str) -> None:
        atomic.swap_in(new, self.root / tier, backup=self.root / "latest_backup" if tier == "latest" else None)

    def _link_tier(self, src: Path, tier: str, manifest: dict[str, Any]) -> None:
        new = self.root / f".new-{tier}"
        atomic.remove_tree(new)
        atomic.link_tree(src, new, {**manifest, "tier": tier})
        self._swap(new, tier)
