"""Token shard formats on disk, read as they are.

Three formats, recognised per folder:

* **ours** (written by ``prepare-data``): ``manifest.json`` + ``{val,train}_NNNNNN.npy``, each an
  ``np.save``'d 1-D uint16 array. The manifest lists every finished shard in stream order with its split
  and token count, the tokenizer's name and :func:`~hf_gpt2_train.data.tokenizer.vocab_hash`, the
  source, and whether the preparation is ``complete``.
* **build-nanogpt / the original system**: ``edufineweb_{train,val}_NNNNNN.npy`` (``np.save`` of uint16,
  no manifest). The split comes from the file name (``val`` in it: validation).
* **llm.c**: ``*.bin`` = 256 int32 header (magic 20240520, version 1, ``header[2]`` = token count) then
  that many uint16 tokens. Split from the file name, as above.

Every shard is memory-mapped: opening a 10B-token folder costs a few file handles and no RAM.

**Damage.** :func:`scan` checks every shard against what describes it before anything reads it: our
manifest's size and token count (and each file's own ``.npy`` header), build-nanogpt's ``.npy`` header, llm.c's
header, each against the file's size; in numbered folders without a manifest a gap in the numbers is a missing
shard. A damaged shard is one line naming the file, what was expected and found, and the fix. It reads a few
hundred bytes per shard; the checksums (every byte) are :mod:`~hf_gpt2_train.data.verify`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.tokenizer import GPT2_VOCAB_HASH
from hf_gpt2_train.fsio import atomic_writer

MANIFEST = "manifest.json"
FORMAT_NAME = "hf-gpt2-train/token-shards"
FORMAT_VERSION = 1
LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 256 * 4
# "val" as a word of the file name: edufineweb_val_000000.npy, tiny_shakespeare_val.bin, fineweb-valid.bin
_VAL_NAME = re.compile(r"(^|[_\-.])val(id|idation)?([_\-.]|\d|$)", re.IGNORECASE)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def split_of(name: str) -> str:
    return "val" if _VAL_NAME.search(Path(name).stem) else "train"


@dataclass
class Shard:
    path: Path
    split: str
    tokens: int
    kind: str  # "npy" or "llmc"
    entry: dict[str, Any] | None = None
    """Its ``manifest.json`` entry (our format): file, split, tokens and, since prepare-data records them, the
    file's size and xxh3_128 checksum (``checkpoint/atomic.py``'s entry layout, chunked above 64 MiB)."""

    def open(self) -> np.ndarray:
        """Memory-map the shard's tokens (uint16, length ``tokens``)."""
        if self.kind == "llmc":
            arr = np.memmap(self.path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES, shape=(self.tokens,))
        else:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return arr


@dataclass
class ShardSet:
    """The shards of one data folder, grouped by split in stream order."""

    root: Path
    format: str
    shards: list[Shard]
    manifest: dict[str, Any] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)
    """One clause per damaged shard ("data shard PATH is truncated: ..."), in stream order."""

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]

    def tokens(self, name: str) -> int:
        return sum(s.tokens for s in self.split(name))

    def identity(self) -> dict[str, Any]:
        """What the run reads, without where: each shard's name, split, token count and checksum (None where the
        folder records none). A checkpoint keeps it, so a resume knows whether it reads the same data (a folder
        moved to another path is the same data)."""
        return {"format": self.format,
                "shards": [[s.path.name, s.split, s.tokens, shard_checksum(s.entry)] for s in self.shards]}


def prepare_command(root: Path, m: dict[str, Any]) -> str:
    """The ``prepare-data`` command that finishes or repairs ``root`` (its manifest's settings, spelled out)."""
    st, src = m.get("settings") or {}, (m.get("settings") or {}).get("source") or {}
    kind, argv = src.get("kind"), []
    if kind == "embedded":
        argv = ["--source", "embedded"]
    elif kind == "hf" and not src.get("data_files"):
        argv = ["--source", src.get("path"), "--source_config", src.get("config") or ""]
    elif kind == "files" and 0 < len(src.get("files") or []) <= 3:
        argv = ["--source", ",".join(f for f, _ in src["files"])]
    if not argv:
        return f"the prepare-data command that made {root} (the same --source and settings, --output_dir {root})"
    if src.get("split", "train") != "train":
        argv += ["--source_split", src["split"]]
    if src.get("text_field", "text") != "text":
        argv += ["--text_field", src["text_field"]]
    argv += ["--output_dir", str(root), "--shard_size", st.get("shard_size"), "--val_tokens", st.get("val_tokens")]
    if st.get("max_tokens"):
        argv += ["--max_tokens", st["max_tokens"]]
    return "`hf-gpt2-train prepare-data " + " ".join(shlex.quote(str(a)) for a in argv) + "`"


def shard_checksum(entry: dict[str, Any] | None) -> str | None:
    """One string for a manifest entry's checksum (a chunked one: the sha256 of its chunks' digests), or None."""
    if not entry:
        return None
    if digest := entry.get("xxh3_128"):
        return f"xxh3_128:{digest}"
    if chunks := entry.get("xxh3_128_chunks"):
        joined = f"{entry.get('chunk_bytes')}:{','.join(chunks)}"
        return f"xxh3_128_chunks:{hashlib.sha256(joined.encode()).hexdigest()[:32]}"
    return None


def read_manifest(root: Path) -> dict[str, Any] | None:
    p = root / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{p} is not readable JSON: re-run the prepare-data command that made {root}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ConfigError(f"{p} is not a hf-gpt2-train shard manifest: point --data_dir at a prepare-data output")
    return m


def write_npy_atomic(path: Path, tokens: np.ndarray) -> None:
    """``np.save`` a uint16 shard through :func:`~hf_gpt2_train.fsio.atomic_writer`: a shard is whole or absent."""
    with atomic_writer(path, "wb") as f:
        np.save(f, np.ascontiguousarray(tokens, dtype=np.uint16), allow_pickle=False)


def _size_clause(path: Path, found: int, expected: int, source: str) -> str:
    state = "is truncated" if found < expected else "is longer than written"
    return f"data shard {path} {state}: {found:,} bytes, {source} {expected:,}"


class WrongArray(ConfigError):
    """A ``.npy`` file whose header is readable but holds no 1-D uint16 array."""


def npy_layout(path: Path) -> tuple[int, int] | str:
    """(tokens, bytes the file must have) from a ``.npy`` file's header, or why the header is unusable (a damaged
    file). WrongArray for a readable header that holds no 1-D uint16 array."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f".npy format version {version} is not the one np.save writes"
            offset = f.tell()
    except (ValueError, EOFError) as e:  # too short for its header, or not .npy bytes at all
        return f"its .npy header cannot be read ({str(e).splitlines()[0][:80]})"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if len(shape) != 1 or dtype != np.uint16:
        raise WrongArray(f"{path} holds a {dtype} array of shape {shape}, not 1-D uint16 GPT-2 tokens")
    return int(shape[0]), offset + 2 * int(shape[0])


def _npy_shard(path: Path, split: str, entry: dict[str, Any] | None = None) -> Shard | str:
    """The shard, or the clause saying how it is damaged: its size against the manifest's (when recorded), its
    token count against the manifest's, and its size against its own header."""
    if not path.is_file():
        return f"data shard {path} is missing"
    size = path.stat().st_size
    if entry and entry.get("size") is not None and size != entry["size"]:
        return _size_clause(path, size, entry["size"], "manifest.json says")
    try:
        layout = npy_layout(path)
    except WrongArray as e:
        if entry is None:  # a folder without manifest: a foreign file rather than a damaged shard
            raise ConfigError(f"{e}: remove it from the data folder") from None
        layout = str(e).removeprefix(f"{path} ")
    if isinstance(layout, str):
        return f"data shard {path} is damaged ({size:,} bytes): {layout}"
    tokens, expected = layout
    if entry and tokens != entry["tokens"]:
        return f"data shard {path} holds {tokens:,} tokens, manifest.json says {entry['tokens']:,}"
    if size != expected:
        return _size_clause(path, size, expected, f"its .npy header says {tokens:,} tokens =")
    return Shard(path, split, tokens, "npy", entry)


def _llmc_shard(path: Path) -> Shard | str:
    size = path.stat().st_size
    try:
        header = np.fromfile(path, dtype=np.int32, count=256)
    except OSError as e:
        return f"data shard {path} cannot be read ({e.strerror or e})"
    if header.shape[0] >= 1 and header[0] != LLMC_MAGIC:
        raise ConfigError(f"{path} is not an llm.c GPT-2 token file (magic {LLMC_MAGIC} missing): copy it again if "
                          "it is a damaged copy, else remove it or re-make it with llm.c's GPT-2 tokenizer")
    if header.shape[0] < 256:
        return _size_clause(path, size, LLMC_HEADER_BYTES, "shorter than llm.c's header of")
    if header[1] != LLMC_VERSION:
        raise ConfigError(f"{path} is llm.c version {header[1]} (GPT-2 shards are version 1, uint16): re-make it "
                          "with the GPT-2 tokenizer")
    n = int(header[2])
    if size != LLMC_HEADER_BYTES + 2 * n:
        return _size_clause(path, size, LLMC_HEADER_BYTES + 2 * n, f"its llm.c header says {n:,} tokens =")
    return Shard(path, split_of(path.name), n, "llmc")


_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_SPLIT_WORD = re.compile(r"train|val(id|idation)?", re.IGNORECASE)


def _gaps(files: list[Path]) -> list[str]:
    """Missing numbers among numbered shards (``edufineweb_{val,train}_NNNNNN``, ``fineweb_train_NNNNNN``): a copy
    that skipped or lost a file. The split word is ignored: build-nanogpt numbers val and train shards together."""
    groups: dict[tuple[str, str, int], dict[int, Path]] = {}
    for p in files:
        if m := _NUMBERED.match(p.stem):
            groups.setdefault((_SPLIT_WORD.sub("*", m.group(1)), p.suffix, len(m.group(2))), {})[int(m.group(2))] = p
    clauses = []
    for (_, _, width), found in groups.items():
        for n in range(min(found), max(found) + 1):
            if n not in found:
                before = found[max(k for k in found if k < n)]
                name = f"{before.stem[:len(before.stem) - width]}{n:0{width}d}{before.suffix}"
                clauses.append(f"data shard {before.parent / name} is missing (the numbers of the shards in "
                               f"{before.parent} skip it)")
    return clauses


def scan(root: Path) -> ShardSet:
    """Find the shards of ``root`` (any of the three formats) and check each against what describes it, without
    reading their tokens (see the module docstring); damaged shards are listed in ``ShardSet.damaged``
    (:func:`~hf_gpt2_train.data.verify.check_data_dir` raises for them, with the fix).

    Raises ConfigError for a missing/empty folder, an unfinished preparation, or another tokenizer.
    """
    if not root.exists():
        raise ConfigError(f"data dir {root} does not exist: run `hf-gpt2-train prepare-data --output_dir {root}` "
                          "first (or leave --data_dir empty for the embedded corpus)")
    if not root.is_dir():
        raise ConfigError(f"data dir {root} is a file, not a folder of token shards: pass the folder")
    m = read_manifest(root)
    if m is not None:
        shards = _scan_ours(root, m)
    else:
        npy = sorted(p for p in root.glob("*.npy") if p.is_file())
        bins = sorted(p for p in root.glob("*.bin") if p.is_file())
        if npy and bins:
            raise ConfigError(f"data dir {root} mixes .npy and llm.c .bin shards: keep one format per folder")
        if not npy and not bins:
            raise ConfigError(f"data dir {root} holds no token shards (manifest.json, edufineweb_*.npy or llm.c "
                              f"*.bin): run `hf-gpt2-train prepare-data --output_dir {root}`")
        found = [_npy_shard(p, split_of(p.name)) for p in npy] if npy else [_llmc_shard(p) for p in bins]
        shards = ShardSet(root, "nanogpt" if npy else "llmc", [s for s in found if isinstance(s, Shard)], {},
                          [*(s for s in found if isinstance(s, str)), *_gaps(npy or bins)])
    return shards


def _scan_ours(root: Path, m: dict[str, Any]) -> ShardSet:
    if m.get("vocab_hash") != GPT2_VOCAB_HASH:
        raise ConfigError(f"shards in {root} were made with tokenizer {m.get('tokenizer')!r} (vocab hash "
                          f"{m.get('vocab_hash')}), not GPT-2's: run `hf-gpt2-train prepare-data` again into a new "
                          "--output_dir (it uses GPT-2's tokenizer)")
    if not m.get("complete"):
        raise ConfigError(f"the preparation of {root} was interrupted and is unfinished: re-run the same "
                          "`hf-gpt2-train prepare-data` command (it resumes where it stopped)")
    shards, damaged = [], []
    for s in listed_shards(root, m):
        (shards if isinstance(s, Shard) else damaged).append(s)
    return ShardSet(root, "ours", shards, m, damaged)


def listed_shards(root: Path, m: dict[str, Any]) -> list[Shard | str]:
    """Each shard ``manifest.json`` lists, in order: the Shard, or the clause saying how it is damaged."""
    return [_npy_shard(root / e["file"], e["split"], e) for e in m.get("shards", [])]


class TokenStream:
    """One split's shards, memory-mapped and concatenated into a single read-only token stream."""

    def __init__(self, shards: list[Shard]):
        self.arrays = [s.open() for s in shards if s.tokens > 0]
        sizes = np.array([a.shape[0] for a in self.arrays], dtype=np.int64)
        # starts[i] = stream offset of shard i's first token; starts[-1] = total
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.starts[-1])

    def read(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """Tokens ``[o, o + length)`` for each stream offset ``o`` -> int64 array ``(len(offsets), length)``.

        A window may cross shard ends (then it is stitched from both shards); the work is per window,
        never per token.
        """
        out = np.empty((len(offsets), length), dtype=np.int64)
        for row, o in enumerate(np.asarray(offsets, dtype=np.int64)):
            o = int(o)
            if o < 0 or o + length > self.total:
                raise IndexError(f"window [{o}, {o + length}) outside the stream of {self.total} tokens")
            i = int(np.searchsorted(self.starts, o, side="right")) - 1
            filled = 0
            while filled < length:
                a = self.arrays[i]
                lo = o + filled - int(self.starts[i])
                take = min(length - filled, a.shape[0] - lo)
                out[row, filled:filled + take] = a[lo:lo + take]
                filled += take
                i += 1
        return out
