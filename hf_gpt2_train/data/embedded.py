"""The embedded corpus: Python's own help topics, so the quickstart needs no download.

``pydoc_data.topics.topics`` ships with every CPython: 79 English help texts (~465k characters,
~139k GPT-2 tokens). Each topic is one document, in sorted topic order. The first
``EMBEDDED_VAL_TOKENS`` tokens of that stream are the validation split (same rule as any
``prepare-data`` run), the rest is training data.

The texts differ slightly between Python versions, so the prepared shards live in a cache folder
named after a hash of the texts: ``$HF_GPT2_TRAIN_CACHE/embedded/<key>`` (default cache root
``~/.cache/hf_gpt2_train``). They are prepared on first use into a temporary sibling folder that is
renamed into place when complete, so concurrent first uses (one per rank) and an interrupted first use
are both safe: a reader only ever sees a complete folder. A prepared folder whose shards were damaged since
(data/verify.py) is moved aside and prepared again: it is a cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path

from hf_gpt2_train.data.shards import FORMAT_VERSION, read_manifest, scan, shard_checksum
from hf_gpt2_train.data.tokenizer import GPT2_VOCAB_HASH

EMBEDDED_VAL_TOKENS = 20_000
"""Validation tokens of the embedded corpus: enough for 2 processes x 4 quickstart val batches (16 x 128)."""


def embedded_documents() -> list[str]:
    """The documents of the embedded corpus, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def embedded_key() -> str:
    """Names the prepared folder: changes with the texts (Python version), the split and the shard format."""
    h = hashlib.sha256(f"{FORMAT_VERSION}:{EMBEDDED_VAL_TOKENS}:{GPT2_VOCAB_HASH}".encode())
    for d in embedded_documents():
        h.update(d.encode("utf-8") + b"\0")
    return f"pydoc-topics-{h.hexdigest()[:12]}"


def cache_root() -> Path:
    env = os.environ.get("HF_GPT2_TRAIN_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_gpt2_train"


def _is_complete(d: Path) -> bool:
    try:
        m = read_manifest(d)
    except Exception:
        return False
    return bool(m and m.get("complete"))


def _is_intact(d: Path) -> bool:
    """Every shard of a prepared folder matches its manifest: sizes, headers and checksums (~280 KB to read)."""
    from hf_gpt2_train.checkpoint.atomic import hash_mismatches

    shards = scan(d)
    files = {s.path.name: s.entry for s in shards.shards if shard_checksum(s.entry)}
    return not shards.damaged and not hash_mismatches(d, {"files": files})


def _discard(d: Path, inode: int) -> None:
    """Move the damaged prepared folder ``d`` (the one with ``inode``: not a new one another process already made
    in its place) out of the way, atomically: concurrent processes may find it damaged too."""
    trash = d.parent / f".trash-{uuid.uuid4().hex[:8]}"
    try:
        if d.stat().st_ino != inode:
            return
        os.rename(d, trash)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temps(parent: Path) -> None:
    """Delete temp folders left by a first use that was killed on this host (its pid no longer runs)."""
    host = socket.gethostname()
    for t in parent.glob(".tmp-*"):
        parts = t.name.split("-")
        if len(parts) < 4 or parts[1] != host.replace("-", "_"):
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(t, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def ensure_embedded(tokenizer_file: str = "", root: Path | None = None) -> Path:
    """Prepare the embedded corpus once (atomically) and return its folder."""
    from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare

    parent = (root or cache_root()) / "embedded"
    final = parent / embedded_key()
    if _is_complete(final):
        checked = final.stat().st_ino
        if _is_intact(final):
            return final
        _discard(final, checked)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent)
    tmp = parent / f".tmp-{socket.gethostname().replace('-', '_')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        run_prepare(PrepareArgs(source="embedded", output_dir=str(tmp), val_tokens=EMBEDDED_VAL_TOKENS,
                                num_proc=1, tokenizer_file=tokenizer_file, progress=False,
                                verbose=False))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: its folder is complete (only whole folders are renamed).
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
