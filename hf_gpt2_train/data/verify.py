"""Token shards checked against what describes them: before every run, and ``hf-gpt2-train data verify DIR``.

**Sizes and headers** (:func:`~hf_gpt2_train.data.shards.scan`) cost a ``stat`` and a few hundred bytes per
shard and run on every process at every start: they catch the common damage of a copy, a truncated, extended
or missing file.

**Checksums** (every byte against the xxh3_128 ``prepare-data`` recorded; folders of build-nanogpt or llm.c
shards carry none) are on by default too (``--verify_data_checksums``), because a file of the right size can
still hold the wrong bytes (a preallocated copy interrupted midway holds zeros). They are hashed exactly as
checkpoints are (``checkpoint/atomic.py``: 64 MiB chunks of all shards in parallel threads), by one process
per machine. What they cost is reading the data: on a 2-core VM (2026-12-04, docs/benchmarks.md) 2 GB took
0.17-0.22 s from the page cache and 1.1-1.3 s from disk, so FineWeb-Edu 10B (20 GB) takes ~2 s cached and
~13 s from that disk. A run pays that once per copy of the data:
a shard whose checksum matched is remembered (cache folder ``verified/``) with its file's identity (device,
inode, size, mtime and ctime, taken before hashing), and later starts only ``stat`` it. Any write to a file
changes its ctime, and a fresh copy is a new inode, so a changed or re-copied shard is hashed again; files
changed less than 2 s before their stamp was taken are not remembered (timestamps are coarse).

The module imports numpy (through ``shards``) only inside its functions: ``data verify`` is registered with
every command line, which must stay light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.fsio import write_json_atomic

if TYPE_CHECKING:
    from hf_gpt2_train.data.shards import ShardSet

RACY_NS = 2_000_000_000
ANNOUNCE_BYTES = 1 << 30  # hashing more than this at a start is announced (it takes seconds)


# ------------------------------------------------------------------------------------ remembered stamps
def _trust_file(root: Path) -> Path:
    from hf_gpt2_train.data.embedded import cache_root

    # Per machine: machines sharing a home folder each have their own copies (and stamps) of a data path.
    key = f"{socket.gethostname()}:{root.resolve()}"
    return cache_root() / "verified" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_trusted(root: Path) -> dict[str, Any]:
    try:
        d = json.loads(_trust_file(root).read_text())
    except (OSError, ValueError):
        return {}
    return d.get("shards", {}) if isinstance(d, dict) and isinstance(d.get("shards"), dict) else {}


def _save_trusted(root: Path, shards: dict[str, Any]) -> None:
    try:
        path = _trust_file(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"root": str(root.resolve()), "shards": shards})
    except OSError:
        pass  # a read-only cache only means hashing again next time


# --------------------------------------------------------------------------------------------- checks
def checksum_problems(shards: ShardSet, remembered: bool = True) -> dict[str, str]:
    """``{file name: clause}`` for each shard whose bytes differ from the checksum its manifest records (stream
    order).

    ``remembered``: skip shards whose file is unchanged since their checksum last matched (module docstring).
    Shards that match are remembered either way.
    """
    from hf_gpt2_train.data.shards import shard_checksum

    files = {s.path.name: s.entry for s in shards.shards if shard_checksum(s.entry)}
    if not files:
        return {}
    known = _load_trusted(shards.root)
    stamps = {n: _stamp(shards.root / n) for n in files}
    todo = {n: e for n, e in files.items()
            if not (remembered and known.get(n) == [stamps[n], shard_checksum(e)])}
    size = sum(e["size"] for e in todo.values())
    if size > ANNOUNCE_BYTES:
        print(f"hf-gpt2-train: checking the checksums of {len(todo)} shard(s) ({size / 1e9:.1f} GB) in {shards.root} "
              "(once per copy of the data)", flush=True)
    bad = atomic.hash_mismatches(shards.root, {"files": todo}) if todo else {}
    now = time.time_ns()
    fresh = {n: [stamps[n], shard_checksum(todo[n])] for n in todo
             if n not in bad and stamps[n] and _stamp(shards.root / n) == stamps[n]
             and now - max(stamps[n][3], stamps[n][4]) > RACY_NS}
    if fresh:
        _save_trusted(shards.root, {**{n: v for n, v in known.items() if n in files and n not in bad}, **fresh})
    return {n: f"data shard {shards.root / n} {why}" for n, why in bad.items()}


def check_data_dir(root: Path, checksums: bool = False) -> ShardSet:
    """The check before anything reads ``root``: sizes and headers, then (``checksums``) the bytes of every shard
    not known to be unchanged since it last matched. ConfigError naming the first damaged shard and the fix."""
    from hf_gpt2_train.data.shards import scan

    shards = scan(root)
    if checksums and not shards.damaged:
        shards.damaged += checksum_problems(shards).values()
    if shards.damaged:
        more = len(shards.damaged) - 1
        tail = f" ({more} more damaged: `hf-gpt2-train data verify {root}` lists them)" if more else ""
        raise ConfigError(f"{shards.damaged[0]}: {fix_for(shards)}{tail}")
    return shards


def fix_for(shards: ShardSet, what: str = "the file") -> str:
    """How to repair the damaged shards of a folder (the end of the one-line error)."""
    if shards.format == "ours":
        from hf_gpt2_train.data.shards import prepare_command

        return (f"re-run {prepare_command(shards.root, shards.manifest)} (it keeps the intact shards and re-makes "
                f"damaged ones), or copy {what} again")
    maker = "build-nanogpt's fineweb.py" if shards.format == "nanogpt" else "llm.c's dev/data scripts"
    return f"copy {what} again from where the folder came from (or re-make the folder with {maker})"


def damaged_shards(root: Path, m: dict[str, Any]) -> dict[int, str]:
    """``{manifest index: clause}`` of the shards ``m`` lists that are missing, damaged by size or header, or (every
    byte read, unless known unchanged since they matched) differ from their checksum: what prepare-data re-makes."""
    from hf_gpt2_train.data.shards import Shard, ShardSet, listed_shards

    found = listed_shards(root, m)
    damaged = {i: s for i, s in enumerate(found) if isinstance(s, str)}
    index = {e["file"]: i for i, e in enumerate(m["shards"])}
    intact = ShardSet(root, "ours", [s for s in found if isinstance(s, Shard)], m)
    damaged.update({index[name]: clause for name, clause in checksum_problems(intact).items()})
    return dict(sorted(damaged.items()))


def identity_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How the data a run reads now differs from the data a checkpoint recorded (``ShardSet.identity()``), or
    None: a shard missing or added, or one with another split, token count or (where both record one) checksum."""
    a = {s[0]: s for s in saved.get("shards", [])}
    b = {s[0]: s for s in now.get("shards", [])}
    for name, (_, split, n, _) in a.items():
        if name not in b:
            return f"{name} ({n:,} {split} tokens) of the run's data is missing"
    for name, (_, split, n, _) in b.items():
        if name not in a:
            return f"{name} ({n:,} {split} tokens) was not part of the run's data"
    for name, (_, split, n, digest) in b.items():
        _, split0, n0, digest0 = a[name]
        if (split, n) != (split0, n0):
            return f"{name} holds {n:,} {split} tokens, the run's held {n0:,} {split0} tokens"
        if digest and digest0 and digest != digest0:
            return (f"{name} holds other bytes (checksum {digest.split(':')[-1][:12]}..., the run's "
                    f"{digest0.split(':')[-1][:12]}...)")
    if list(a) != list(b):
        return "its shards are read in another order"
    return None


# ------------------------------------------------------------------------------------------------ CLI
def _cmd_verify(args: argparse.Namespace) -> int:
    from hf_gpt2_train.data.shards import scan, shard_checksum

    root = Path(args.data_dir).expanduser()
    shards = scan(root)  # not a data folder: ConfigError, exit 2
    total = len(shards.shards) + len(shards.damaged)
    recorded = sum(1 for s in shards.shards if shard_checksum(s.entry))
    t0, nbytes = time.perf_counter(), sum(s.entry["size"] for s in shards.shards if shard_checksum(s.entry))
    if args.checksums:
        shards.damaged += checksum_problems(shards, remembered=False).values()
    seconds = time.perf_counter() - t0
    for clause in shards.damaged:
        print(f"DAMAGED  {clause}")
    if shards.damaged:
        print(f"{len(shards.damaged)} of {total} shard(s) of {root} damaged: {fix_for(shards, 'them')}")
        return 1
    checked = "sizes and headers"
    if args.checksums and recorded:
        checked = f"sizes, headers and checksums ({nbytes / 1e6:,.1f} MB read in {seconds:.2f} s)"
    note = ""
    if not args.checksums and recorded:
        note = "; add --checksums to compare every byte"
    elif args.checksums and recorded < len(shards.shards):
        note = (f"; {len(shards.shards) - recorded} shard(s) have no recorded checksum "
                f"({'prepared before prepare-data recorded them' if shards.format == 'ours' else shards.format + ' shards carry none'})")
    print(f"OK  {root}: {total} shards ({shards.format}), {shards.tokens('train'):,} train + "
          f"{shards.tokens('val'):,} val tokens; {checked} match{note}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``data verify``."""
    p = subparsers.add_parser("data", help="Check a folder of token shards (e.g. after copying it).")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    vp = sub.add_parser("verify", help="Check every shard of a data folder against what describes it; exit 0 "
                        "intact, 1 damaged shards (each named), 2 not a data folder.",
                        description="Check every token shard of DATA_DIR (prepare-data's, build-nanogpt's .npy or "
                        "llm.c's .bin) against its manifest or header: sizes and headers by default, every byte "
                        "with --checksums. Exit 0: intact; 1: damaged shards (each named, with the fix); 2: not a "
                        "usable data folder.")
    vp.add_argument("data_dir", help="The folder (prepare-data's --output_dir, or a folder of .npy/.bin shards).")
    vp.add_argument("--checksums", action="store_true",
                    help="Also read every byte and compare it with the xxh3_128 checksums prepare-data recorded.")
    vp.set_defaults(func=_cmd_verify)
