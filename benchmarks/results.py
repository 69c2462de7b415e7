"""What the checkpoint benchmarks share: a scratch folder removed afterwards, the date and machine of a
measurement, and its results as JSON (``--dir``, ``--output``). Imported by name: a benchmark's own folder is
first on ``sys.path`` when it runs as a script."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def add_folder_args(ap: argparse.ArgumentParser) -> None:
    """``--dir`` (where the scratch folder goes) and ``--output`` (the JSON results)."""
    ap.add_argument("--dir", default="", help="Folder to write in (default: a new folder in the system temp folder; "
                    "pass a folder on the disk your checkpoints go to). Removed afterwards.")
    ap.add_argument("--output", default="", help="Also write the results as JSON to this file.")


@contextlib.contextmanager
def scratch_folder(prefix: str, parent: str = "") -> Iterator[Path]:
    """A new folder (inside ``parent`` when given), removed with everything in it afterwards."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or None))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stamp(torch_version: str = "") -> dict[str, Any]:
    """``date`` (UTC), ``machine`` (processor, CPU count and, when given, the torch version) and
    ``load_average_at_end`` (other work on the machine: the measurement shares it) of a result."""
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine + (f", torch {torch_version}" if torch_version else ""),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_results(path: str, results: dict[str, Any]) -> None:
    """The results as indented JSON at ``path`` (its folder created); nothing when ``path`` is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))
