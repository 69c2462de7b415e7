"""``hf-gpt2-train checkpoints list OUTPUT_DIR`` and ``hf-gpt2-train checkpoints verify PATH``."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.config import ConfigError

_TIER_RANK = {"latest": 0, "latest_backup": 1, "best": 2, "final": 3}


def _sort_key(p: Path) -> tuple[int, int, str]:
    m = re.search(r"(\d+)$", p.name)
    group = _TIER_RANK.get(p.name, 4 if p.name.startswith("milestone_") else 5)
    return group, int(m.group(1)) if m else 0, p.name


def checkpoint_root(path: Path) -> Path:
    """OUTPUT_DIR/checkpoints, or PATH itself when it already is a checkpoints folder."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir() and any(c.is_dir() and (c / atomic.MANIFEST).exists() for c in path.iterdir()):
        return path
    if not path.exists():
        raise ConfigError(f"{path} does not exist: pass a run's --output_dir")
    raise ConfigError(f"{path} holds no checkpoints folder: pass a run's --output_dir")


def list_checkpoints(root: Path, hashes: bool = False) -> list[dict[str, Any]]:
    """One row per tier folder: tier, step, tokens, val_loss, val_loss_step, bytes, created, valid, reason.

    ``val_loss`` is the latest validation loss as of the checkpoint, measured at ``val_loss_step`` (None in
    manifests written before that field existed). ``hashes``: also check every file's checksum (reads it all)."""
    rows = []
    for p in sorted((c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_sort_key):
        v = atomic.verify(p, hashes=hashes)
        m = v.manifest
        if not v.ok:
            try:
                m = atomic.read_manifest(p)
            except atomic.CheckpointInvalid:
                m = {}
        rows.append({"tier": p.name, "path": str(p), "step": m.get("step"), "tokens": m.get("tokens_seen"),
                     "val_loss": m.get("val_loss"), "val_loss_step": m.get("val_loss_step"), "bytes": atomic.folder_bytes(p), "created": m.get("created_unix"),
                     "valid": v.ok, "reason": v.reason})
    return rows


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _age(created: float | None) -> str:
    if not created:
        return "-"
    s = max(0.0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


def val_loss_cell(row: dict[str, Any]) -> str:
    """'4.1234' when measured at the checkpoint's own step, '4.5678 (step 80)' when at an earlier one, '-' if none."""
    v = row.get("val_loss")
    if v is None:
        return "-"
    at = row.get("val_loss_step")
    if at == row.get("step"):
        return f"{v:.4f}"
    return f"{v:.4f} (step {at if at is not None else '?'})"


def _cmd_list(args: argparse.Namespace) -> int:
    root = checkpoint_root(Path(args.output_dir))
    rows = list_checkpoints(root, hashes=args.checksums)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [("tier", "step", "tokens", "val_loss", "size", "age", "valid")]
    for r in rows:
        table.append((r["tier"], "-" if r["step"] is None else str(r["step"]),
                      "-" if r["tokens"] is None else f"{r['tokens']:,}",
                      val_loss_cell(r), _human_bytes(r["bytes"]),
                      _age(r["created"]), "yes" if r["valid"] else f"NO: {r['reason']}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    folders = [Path(r["path"]) for r in rows]
    print(f"\n{len(rows)} checkpoint folder(s) in {root}; {_human_bytes(atomic.unique_bytes(folders))} on disk "
          f"(tiers of one save share files through hard links); validity checked by "
          f"{'sizes and checksums' if args.checksums else 'sizes (add --checksums for a full check)'}")
    pending = [c.name for c in root.iterdir() if c.name.startswith((atomic.TMP_SAVE, ".new-"))]
    if pending:
        print(f"in progress or interrupted (never used for resume): {', '.join(sorted(pending))}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: pass a checkpoint folder or a run's --output_dir")
    folders = [path] if (path / atomic.MANIFEST).exists() or not (
        (path / "checkpoints").is_dir() or any((c / atomic.MANIFEST).exists() for c in path.iterdir() if c.is_dir())
    ) else sorted((c for c in checkpoint_root(path).iterdir() if c.is_dir() and not c.name.startswith(".")),
                  key=_sort_key)
    check = "sizes" if args.no_checksums else "sizes and checksums"
    bad = 0
    for f in folders:
        v = atomic.verify(f, hashes=not args.no_checksums)
        if v.ok:
            print(f"OK       {f}  (step {v.manifest.get('step')}, {len(v.manifest['files'])} files, {check} match)")
        else:
            bad += 1
            print(f"INVALID  {f}: {v.reason}")
    if bad:
        print(f"{bad} of {len(folders)} checkpoint(s) invalid")
    return 1 if bad else 0


def register_cli(subparsers: Any) -> None:
    """Add ``checkpoints list`` and ``checkpoints verify``."""
    p = subparsers.add_parser("checkpoints", help="List or verify a run's checkpoints.")
    sub = p.add_subparsers(dest="checkpoints_command", required=True, metavar="ACTION")
    lp = sub.add_parser("list", help="Table of tier, step, tokens, val loss, size, age and validity.")
    lp.add_argument("output_dir", help="The run's --output_dir (or its checkpoints folder).")
    lp.add_argument("--checksums", action="store_true",
                    help="Check every file's checksum, reading every byte (default: sizes only).")
    lp.add_argument("--sha256", dest="checksums", action="store_true", help=argparse.SUPPRESS)  # the old spelling
    lp.add_argument("--json", action="store_true", help="Print JSON rows instead of a table.")
    lp.set_defaults(func=_cmd_list)
    vp = sub.add_parser("verify", help="Check a checkpoint (or every checkpoint of a run) against its manifest; "
                        "exit 1 if any is invalid.")
    vp.add_argument("path", help="A checkpoint folder, or a run's --output_dir to verify all of them.")
    vp.add_argument("--no_checksums", action="store_true", help="Only check that files exist with their sizes.")
    vp.add_argument("--no_sha256", dest="no_checksums", action="store_true", help=argparse.SUPPRESS)  # old spelling
    vp.set_defaults(func=_cmd_verify)
