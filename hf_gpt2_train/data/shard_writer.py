"""``prepare-data``'s token stream cut into shards, each recorded with its size, checksum and start.

A shard's ``manifest.json`` entry: ``file``, ``split``, ``tokens``, ``stream_offset``; ``size`` and ``xxh3_128``
(``chunk_bytes`` + ``xxh3_128_chunks`` above 64 MiB: the entry layout of ``checkpoint/atomic.py``, so shards are
hashed and verified by the checkpoint code, fast); and ``start``, the resume point at its first token (source
position, documents and tokens already taken), from which a re-run re-makes that shard alone when it is damaged
(``rewrite``). The checksum is taken right after the shard is written, from the page cache (~30 ms for a
100M-token shard, against the minutes its tokens took).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.shards import MANIFEST, shard_checksum, shard_name, write_npy_atomic
from hf_gpt2_train.fsio import fsync_dir, write_json_atomic

INITIAL = {"tokens": 0, "documents": 0, "source_state": None, "skip_docs": 0, "skip_tokens": 0}
"""The resume point of the stream's first token."""


def shard_entry(path: Path) -> dict[str, Any]:
    """Size and xxh3_128 checksum of a written shard (chunked above 64 MiB, chunks hashed in parallel)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return atomic.file_entries(path.parent, [path], pool)[path.name]


class ShardWriter:
    """Cuts the token stream into val/train shards from ``start``, the resume point of shard ``index``.

    Normally it appends each shard it writes to the manifest and records a resume point after it. With
    ``rewrite`` (shard indices) it replays finished shards and re-makes only those, in place, checking that the
    stream still cuts into the manifest's shards and that a re-made shard has its recorded checksum
    (ConfigError otherwise: the source changed).
    """

    def __init__(self, out: Path, manifest: dict[str, Any], val_tokens: int, shard_size: int, max_tokens: int,
                 start: dict[str, Any], index: int, rewrite: set[int] | None = None):
        self.out, self.m = out, manifest
        self.val_tokens, self.shard_size = val_tokens, shard_size
        self.limit = max_tokens or None
        self.start = dict(start)  # resume point of the shard being filled
        self.pos: int = start["tokens"]  # stream position of the next token
        self.docs: int = start["documents"]
        self.index = index  # manifest index of the shard being filled
        self.rewrite, self.rewritten = rewrite, []
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.count = {sp: sum(1 for s in manifest["shards"][:index] if s["split"] == sp) for sp in ("val", "train")}

    @property
    def at_limit(self) -> bool:
        return self.limit is not None and self.pos >= self.limit

    @property
    def done(self) -> bool:
        if self.rewrite is not None:
            left = sorted(t for t in self.rewrite if t >= self.index)
            # A repair pass ends after its last shard, or where the next one can start from its own resume point.
            if not left or (left[0] > self.index and self.m["shards"][left[0]].get("start") is not None):
                return True
        return self.at_limit

    def _room(self) -> int:
        room = self.shard_size - self.fill
        if self.pos < self.val_tokens:
            room = min(room, self.val_tokens - self.pos)
        if self.limit is not None:
            room = min(room, self.limit - self.pos)
        return room

    def _flush(self, resume: dict[str, Any] | None) -> None:
        split = "val" if self.pos - self.fill < self.val_tokens else "train"
        entry = {"file": shard_name(split, self.count[split]), "split": split, "tokens": self.fill,
                 "stream_offset": self.pos - self.fill}
        if self.rewrite is not None:
            self._replay(entry)
        else:
            write_npy_atomic(self.out / entry["file"], self.buf[: self.fill])
            self.m["shards"].append({**entry, **shard_entry(self.out / entry["file"]), "start": self.start})
            self.m["tokens"][split] += self.fill
            self.m["documents"] = self.docs
            if resume is not None:
                self.m["resume"] = resume
                write_json_atomic(self.out / MANIFEST, self.m)
        self.count[split] += 1
        self.index += 1
        self.fill = 0
        if resume is not None:
            self.start = resume

    def _replay(self, entry: dict[str, Any]) -> None:
        """A shard met by a repair pass: re-made in place if it is to be rewritten; its start recorded either way."""
        rec = self.m["shards"][self.index] if self.index < len(self.m["shards"]) else None
        keys = ("file", "split", "tokens")
        changed = "source changed since it was prepared: prepare it again into a new --output_dir"
        if rec is None or [rec[k] for k in keys] != [entry[k] for k in keys]:
            was = "nothing" if rec is None else f"{rec['file']} ({rec['tokens']:,} tokens)"
            raise ConfigError(f"re-making the shards of {self.out} gave {entry['file']} ({entry['tokens']:,} tokens) "
                              f"where it had {was}: the {changed}")
        if self.index in self.rewrite:
            tmp = self.out / f"{rec['file']}.repair.tmp"  # a killed repair leaves a *.tmp, which a re-run removes
            write_npy_atomic(tmp, self.buf[: self.fill])
            new = shard_entry(tmp)
            if shard_checksum(rec) and shard_checksum(rec) != shard_checksum(new):
                tmp.unlink()
                raise ConfigError(f"re-making {rec['file']} of {self.out} gave other bytes than its recorded "
                                  f"checksum: the {changed}")
            os.replace(tmp, self.out / rec["file"])
            fsync_dir(self.out)
            rec.update(new)  # records size and checksum where the manifest predates them
            self.rewritten.append(self.index)
        rec.setdefault("start", self.start)

    def add(self, chunk_state: Any, tokens: np.ndarray, lens: np.ndarray, first: int, skipped: int = 0) -> None:
        """Append ``tokens[first:]`` (``first``: tokens of the chunk's first doc written before a resume);
        ``chunk_state``: the source position of the chunk's first document, ``skipped``: documents of the chunk
        before ``tokens`` (done before a resume)."""
        ends = np.cumsum(lens)
        starts = ends - lens
        off = first
        docs_before = self.docs - int(first > 0)  # documents started before this chunk
        while off < len(tokens) and not self.done:
            n = min(self._room(), len(tokens) - off)
            self.buf[self.fill:self.fill + n] = tokens[off:off + n]
            self.fill += n
            off += n
            self.pos += n
            self.docs = docs_before + int(np.searchsorted(starts, off, side="left"))
            if self.fill == self.shard_size or self.pos == self.val_tokens or self.at_limit:
                k = int(np.searchsorted(ends, off, side="right"))  # documents of this chunk fully written
                t = off - (int(ends[k - 1]) if k else 0)
                self._flush({"tokens": self.pos, "documents": self.docs, "source_state": chunk_state,
                             "skip_docs": skipped + k, "skip_tokens": t})

    def finish(self) -> None:
        """The source ended (or the pass is done): the last, shorter shard; a normal pass marks the manifest
        complete."""
        if self.fill:
            self._flush(None)
        if self.rewrite is None:
            self.m["complete"] = True
            self.m["resume"] = None
            write_json_atomic(self.out / MANIFEST, self.m)
