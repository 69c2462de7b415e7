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
"""

from __future__ import annotations

import json
import re
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

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]

    def tokens(self, name: str) -> int:
        return sum(s.tokens for s in self.split(name))


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


def _npy_tokens(path: Path) -> int:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or arr.dtype != np.uint16:
        raise ConfigError(f"{path} holds a {arr.dtype} array of shape {arr.shape}, not 1-D uint16 GPT-2 tokens: "
                          "remove it from the data folder")
    return int(arr.shape[0])


def _llmc_tokens(path: Path) -> int:
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.shape[0] < 256 or header[0] != LLMC_MAGIC:
        raise ConfigError(f"{path} is not an llm.c GPT-2 token file (magic {LLMC_MAGIC} missing): remove it or "
                          "re-make it with llm.c's GPT-2 tokenizer")
    if header[1] != LLMC_VERSION:
        raise ConfigError(f"{path} is llm.c version {header[1]} (GPT-2 shards are version 1, uint16): re-make it "
                          "with the GPT-2 tokenizer")
    n = int(header[2])
    size = path.stat().st_size
    if size != LLMC_HEADER_BYTES + 2 * n:
        raise ConfigError(f"{path} is truncated ({size} bytes, header says {n} tokens): re-make or remove it")
    return n


def scan(root: Path) -> ShardSet:
    """Find the shards of ``root`` (any of the three formats) without reading their tokens.

    Raises ConfigError for a missing/empty folder, an unfinished preparation or another tokenizer.
    """
    if not root.exists():
        raise ConfigError(f"data dir {root} does not exist: run `hf-gpt2-train prepare-data --output_dir {root}` "
                          "first (or leave --data_dir empty for the embedded corpus)")
    if not root.is_dir():
        raise ConfigError(f"data dir {root} is a file, not a folder of token shards: pass the folder")
    m = read_manifest(root)
    if m is not None:
        return _scan_ours(root, m)
    npy = sorted(p for p in root.glob("*.npy") if p.is_file())
    bins = sorted(p for p in root.glob("*.bin") if p.is_file())
    if npy and bins:
        raise ConfigError(f"data dir {root} mixes .npy and llm.c .bin shards: keep one format per folder")
    if npy:
        shards = [Shard(p, split_of(p.name), _npy_tokens(p), "npy") for p in npy]
        return ShardSet(root, "nanogpt", shards)
    if bins:
        shards = [Shard(p, split_of(p.name), _llmc_tokens(p), "llmc") for p in bins]
        return ShardSet(root, "llmc", shards)
    raise ConfigError(f"data dir {root} holds no token shards (manifest.json, edufineweb_*.npy or llm.c *.bin): "
                      f"run `hf-gpt2-train prepare-data --output_dir {root}`")


def _scan_ours(root: Path, m: dict[str, Any]) -> ShardSet:
    if m.get("vocab_hash") != GPT2_VOCAB_HASH:
        raise ConfigError(f"shards in {root} were made with tokenizer {m.get('tokenizer')!r} (vocab hash "
                          f"{m.get('vocab_hash')}), not GPT-2's: run `hf-gpt2-train prepare-data` again into a new "
                          "--output_dir (it uses GPT-2's tokenizer)")
    if not m.get("complete"):
        raise ConfigError(f"the preparation of {root} was interrupted and is unfinished: re-run the same "
                          "`hf-gpt2-train prepare-data` command (it resumes where it stopped)")
    shards: list[Shard] = []
    for s in m.get("shards", []):
        p = root / s["file"]
        if not p.is_file():
            raise ConfigError(f"shard {p} listed in {root / MANIFEST} is missing: re-run prepare-data into a new "
                              "--output_dir")
        n = _npy_tokens(p)
        if n != s["tokens"]:
            raise ConfigError(f"shard {p} has {n} tokens, the manifest says {s['tokens']}: the file was changed; "
                              "re-run prepare-data into a new --output_dir")
        shards.append(Shard(p, s["split"], n, "npy"))
    return ShardSet(root, "ours", shards, m)


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
