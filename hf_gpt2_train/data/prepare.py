"""``hf-gpt2-train prepare-data``: documents -> GPT-2 token shards + manifest, resumable.

The token stream is ``<|endoftext|> doc0 <|endoftext|> doc1 ...`` (tiktoken ``gpt2``
``encode_ordinary``, EOT before each document, as build-nanogpt does) in source order.

**Split rule (pinned).** Tokens ``[0, val_tokens)`` of that stream are the validation split, every
later token is training data (a document that crosses the boundary is cut there). The validation
set therefore depends only on the source and ``--val_tokens``, never on ``--max_tokens`` or on how far
a preparation got: preparing 1B or 10B tokens gives the same val set. With the defaults (100M-token
shards, 100M val tokens) this is build-nanogpt's rule (its shard 0 is val).

**Shards.** Each split is cut into ``{split}_NNNNNN.npy`` files of ``--shard_size`` tokens (uint16,
``np.save``; the last one of a split may be shorter), written under a temp name, fsync'd and renamed.

**Resume.** After every shard the manifest records where the stream stands: the source's position at
the start of the current tokenizer chunk, the documents of that chunk already done and the tokens
already taken from the next one. A re-run with the same arguments (after Ctrl-C, kill -9, a crash)
keeps the finished shards, restores that position and produces exactly the files an uninterrupted run
would have produced. Tokenisation runs in ``--num_proc`` processes over chunks of documents; results are
consumed in submission order, so the output does not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    read_manifest,
    shard_name,
    write_npy_atomic,
)
from hf_gpt2_train.data.sources import DocSource, open_source
from hf_gpt2_train.data.tokenizer import EOT, get_encoding, vocab_hash
from hf_gpt2_train.fsio import write_json_atomic

DEFAULT_SOURCE = "HuggingFaceFW/fineweb-edu"
DEFAULT_SOURCE_CONFIG = "sample-10BT"
DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_TOKENS = 100_000_000
# A tokenizer task: this many documents or characters, whichever comes first (big enough to amortise
# inter-process transfer, small enough to keep every process busy and memory flat).
CHUNK_DOCS = 512
CHUNK_CHARS = 1_000_000


@dataclass
class PrepareArgs:
    source: str = DEFAULT_SOURCE
    """'embedded', local .txt/.jsonl/.parquet files/folders/globs (comma-separated), or a HF dataset id."""
    output_dir: str = ""
    """Folder for the shards and manifest.json."""
    source_config: str | None = None
    """HF dataset config (name); None: sample-10BT for the default FineWeb-Edu, else the dataset's default."""
    source_split: str = "train"
    """HF dataset split to read."""
    text_field: str = "text"
    """Field/column holding the text (.jsonl, .parquet, HF datasets)."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Tokens per shard."""
    val_tokens: int | None = None
    """First N tokens of the stream form the validation split (default 100M; embedded corpus: 20,000)."""
    max_tokens: int = 0
    """Stop after N tokens in all (val + train); 0: the whole source."""
    num_proc: int = 0
    """Tokenizer processes (0: one per CPU core)."""
    tokenizer_file: str = ""
    """Another gpt2.tiktoken ranks file (default: the GPT-2 vocabulary shipped in the package)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    verbose: bool = True
    """Print what was done (resumed, finished) on stdout."""


# ----------------------------------------------------------------------------------------- tokenising
_worker_enc: Any = None


def _watch_parent(parent: int) -> None:
    # A worker whose parent was killed (kill -9) would wait on its task queue forever: exit instead.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(tokenizer_file: str, parent: int) -> None:
    global _worker_enc
    _worker_enc = get_encoding(tokenizer_file)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def tokenize_docs(docs: list[str], enc: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """EOT + ``encode_ordinary(doc)`` for each doc -> (uint16 tokens, int64 per-document lengths)."""
    enc = enc or _worker_enc
    ids: list[int] = []
    lens = np.empty(len(docs), dtype=np.int64)
    for i, d in enumerate(docs):
        before = len(ids)
        ids.append(EOT)
        ids.extend(enc.encode_ordinary(d))
        lens[i] = len(ids) - before
    arr = np.array(ids, dtype=np.uint32)
    if arr.size and int(arr.max()) >= 2**16:
        raise ValueError("token id does not fit uint16")  # impossible for GPT-2 (ids < 50257)
    return arr.astype(np.uint16), lens


@dataclass
class _Chunk:
    state: dict[str, Any] | None  # source position at the chunk's first document
    docs: list[str]


def _chunks(source: DocSource, start: dict[str, Any] | None, skip_docs: int) -> Iterator[_Chunk]:
    """Chunks of documents, each tagged with the source position of its first document."""
    gen = source.docs(start)
    state = start
    for _ in range(skip_docs):  # documents of the resume chunk that were already done
        if next(gen, None) is None:
            return
        state = source.state()
    docs: list[str] = []
    chars = 0
    for d in gen:
        docs.append(d)
        chars += len(d)
        if len(docs) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield _Chunk(state, docs)
            state = source.state()
            docs, chars = [], 0
    if docs:
        yield _Chunk(state, docs)


def _tokenized(chunks: Iterator[_Chunk], num_proc: int, tokenizer_file: str
               ) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
    """Tokenise chunks in ``num_proc`` processes; yields in input order, with a bounded number in flight."""
    if num_proc <= 1:
        enc = get_encoding(tokenizer_file)
        for c in chunks:
            yield (c, *tokenize_docs(c.docs, enc))
        return
    import multiprocessing as mp

    with mp.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_file, os.getpid())) as pool:
        pending: deque = deque()
        # Pool.imap would read the whole source ahead of the writer; apply_async + a bounded deque keeps
        # memory flat and order fixed.
        for c in chunks:
            pending.append((c, pool.apply_async(tokenize_docs, (c.docs,))))
            if len(pending) >= 2 * num_proc + 2:
                c0, r = pending.popleft()
                yield (c0, *r.get())
        while pending:
            c0, r = pending.popleft()
            yield (c0, *r.get())


# ------------------------------------------------------------------------------------------ preparing
def _settings(args: PrepareArgs, source: DocSource, vhash: str, val_tokens: int) -> dict[str, Any]:
    return {"source": source.descriptor(), "shard_size": args.shard_size, "val_tokens": val_tokens,
            "max_tokens": args.max_tokens, "vocab_hash": vhash}


def _check_args(args: PrepareArgs) -> None:
    if not args.output_dir:
        raise ConfigError("prepare-data needs --output_dir DIR")
    if args.shard_size < 1:
        raise ConfigError(f"--shard_size {args.shard_size} must be >= 1 token")
    if args.val_tokens is not None and args.val_tokens < 0:
        raise ConfigError("--val_tokens must be >= 0")
    if args.max_tokens < 0:
        raise ConfigError("--max_tokens must be >= 0 (0: the whole source)")


def _describe(src: Any) -> str:
    if not isinstance(src, dict):
        return repr(src)
    if src.get("kind") == "files":
        files = src.get("files") or [["?"]]
        return f"{files[0][0]}" + (f" and {len(files) - 1} more files" if len(files) > 1 else "")
    if src.get("kind") == "hf":
        return f"{src.get('path')} ({src.get('config') or 'default config'})"
    return str(src.get("kind"))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k} {old.get(k)!r} vs now {new[k]!r}" if k != "source" else
                     f"source {_describe(old.get(k))} vs now {_describe(new[k])}" for k in keys)


def _open_output(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest to resume, None for a fresh (empty) folder; ConfigError when the folder is not ours."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file: pass a folder")
    m = read_manifest(out) if out.exists() else None
    if m is None:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--output_dir {out} is not empty and holds no prepare-data manifest: choose a new or "
                              "empty --output_dir (nothing was changed)")
        return None
    if m.get("settings") != settings:
        raise ConfigError(f"--output_dir {out} holds shards prepared with other settings "
                          f"({_differences(m.get('settings', {}), settings)}): choose a new --output_dir, or repeat "
                          "the original command to finish it (nothing was changed)")
    for s in m["shards"]:
        p = out / s["file"]
        if not p.is_file():
            raise ConfigError(f"shard {p} listed in the manifest is missing: remove {out} and prepare again")
    return m


class _Writer:
    """Cuts the token stream into val/train shards and records a resume point after each one."""

    def __init__(self, out: Path, manifest: dict[str, Any], val_tokens: int, shard_size: int, max_tokens: int):
        self.out, self.m = out, manifest
        self.val_tokens, self.shard_size = val_tokens, shard_size
        self.limit = max_tokens or None
        r = manifest["resume"]
        self.pos: int = r["tokens"]  # stream position of the next token
        self.docs: int = r["documents"]
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.count = {sp: sum(1 for s in manifest["shards"] if s["split"] == sp) for sp in ("val", "train")}

    @property
    def done(self) -> bool:
        return self.limit is not None and self.pos >= self.limit

    def _room(self) -> int:
        room = self.shard_size - self.fill
        if self.pos < self.val_tokens:
            room = min(room, self.val_tokens - self.pos)
        if self.limit is not None:
            room = min(room, self.limit - self.pos)
        return room

    def _flush(self, resume: dict[str, Any] | None) -> None:
        split = "val" if self.pos - self.fill < self.val_tokens else "train"
        name = shard_name(split, self.count[split])
        write_npy_atomic(self.out / name, self.buf[: self.fill])
        self.m["shards"].append({"file": name, "split": split, "tokens": self.fill,
                                 "stream_offset": self.pos - self.fill})
        self.count[split] += 1
        self.fill = 0
        self.m["tokens"][split] += self.m["shards"][-1]["tokens"]
        self.m["documents"] = self.docs
        if resume is not None:
            self.m["resume"] = resume
            write_json_atomic(self.out / MANIFEST, self.m)

    def add(self, chunk: _Chunk, tokens: np.ndarray, lens: np.ndarray, first: int) -> None:
        """Append ``tokens[first:]`` (``first``: tokens of the chunk's first doc written before a resume)."""
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
            if self.fill == self.shard_size or self.pos == self.val_tokens or self.done:
                k = int(np.searchsorted(ends, off, side="right"))  # documents of this chunk fully written
                t = off - (int(ends[k - 1]) if k else 0)
                self._flush({"tokens": self.pos, "documents": self.docs, "source_state": chunk.state,
                             "skip_docs": k, "skip_tokens": t})

    def finish(self) -> None:
        if self.fill:
            self._flush(None)
        self.m["complete"] = True
        self.m["resume"] = None
        write_json_atomic(self.out / MANIFEST, self.m)


def run_prepare(args: PrepareArgs, source: DocSource | None = None) -> Path:
    """Prepare (or finish preparing) ``args.output_dir``; returns it.

    ``source`` overrides ``args.source`` (e.g. an ``HFDataset`` built with ``data_files``).
    """
    from hf_gpt2_train.data.embedded import EMBEDDED_VAL_TOKENS

    _check_args(args)
    out = Path(args.output_dir).expanduser()
    if source is None:
        config = args.source_config
        if config is None:
            config = DEFAULT_SOURCE_CONFIG if args.source == DEFAULT_SOURCE else ""
        source = open_source(args.source, config, args.source_split, args.text_field)
    enc = get_encoding(args.tokenizer_file)
    val_tokens = args.val_tokens if args.val_tokens is not None else (
        EMBEDDED_VAL_TOKENS if args.source == "embedded" else DEFAULT_VAL_TOKENS)
    if args.max_tokens and args.max_tokens <= val_tokens:
        raise ConfigError(f"--max_tokens {args.max_tokens} leaves no training tokens after the first --val_tokens "
                          f"{val_tokens} (the validation split): raise --max_tokens or lower --val_tokens")
    settings = _settings(args, source, vocab_hash(enc), val_tokens)
    m = _open_output(out, settings)
    if m is None:
        source.check()  # a wrong --text_field etc. fails here, before the output folder exists
    if m is not None and m.get("complete"):
        _say(args, f"{out} is already complete ({m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens)")
        return out
    if m is None:
        out.mkdir(parents=True, exist_ok=True)
        m = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": enc.name, "vocab_hash": vocab_hash(enc),
             "dtype": "uint16", "settings": settings, "complete": False, "tokens": {"val": 0, "train": 0},
             "documents": 0, "shards": [],
             "resume": {"tokens": 0, "documents": 0, "source_state": None, "skip_docs": 0, "skip_tokens": 0}}
        write_json_atomic(out / MANIFEST, m)
    else:
        for t in out.glob("*.tmp"):  # a shard or manifest a killed run was writing
            t.unlink()
        _say(args, f"resuming {out} at token {m['resume']['tokens']:,} ({len(m['shards'])} shards done)")
    r = m["resume"]
    num_proc = args.num_proc or os.cpu_count() or 1
    writer = _Writer(out, m, val_tokens, args.shard_size, args.max_tokens)
    bar = _progress_bar(args, source, writer)
    first = r["skip_tokens"]
    t0, pos0 = time.time(), writer.pos
    results = _tokenized(_chunks(source, r["source_state"], r["skip_docs"]), num_proc, args.tokenizer_file)
    try:
        for chunk, tokens, lens in results:
            before, docs_before = writer.pos, writer.docs
            writer.add(chunk, tokens, lens, first)
            first = 0
            if bar is not None:
                bar.update((writer.pos - before) if bar.unit == "tok" else (writer.docs - docs_before))
                bar.set_postfix_str(f"{writer.pos / 1e6:,.1f}M tok, {writer.docs:,} docs, "
                                    f"{(writer.pos - pos0) / max(time.time() - t0, 1e-9) / 1e3:,.0f}k tok/s, "
                                    f"{len(m['shards'])} shards", refresh=False)
            if writer.done:
                break
    finally:
        results.close()  # stops the tokenizer processes at once (also on errors)
    writer.finish()
    if bar is not None:
        bar.close()
    if m["tokens"]["val"] + m["tokens"]["train"] == 0:
        raise ConfigError(f"--source {args.source} holds no text: check the files / --text_field")
    if m["tokens"]["train"] == 0:
        raise ConfigError(f"all {m['tokens']['val']:,} tokens of the source went to the validation split (the first "
                          f"--val_tokens {val_tokens:,}): prepare again into a new --output_dir with a smaller "
                          "--val_tokens")
    _say(args, f"{out}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens from {m['documents']:,} "
               f"documents in {len(m['shards'])} shards")
    return out


def _say(args: PrepareArgs, msg: str) -> None:
    if args.verbose:
        print(msg, flush=True)


def _progress_bar(args: PrepareArgs, source: DocSource, writer: _Writer) -> Any:
    """Tokens against --max_tokens, else documents against the source's document count when known."""
    if not args.progress:
        return None
    from tqdm.auto import tqdm

    if args.max_tokens:
        return tqdm(total=args.max_tokens, initial=writer.pos, unit="tok", unit_scale=True, mininterval=1.0,
                    desc="prepare-data")
    n = source.num_docs()
    if n is not None:
        return tqdm(total=n, initial=writer.docs, unit="doc", mininterval=1.0, desc="prepare-data")
    return tqdm(initial=writer.pos, unit="tok", unit_scale=True, mininterval=1.0, desc="prepare-data")


# ------------------------------------------------------------------------------------------------ CLI
DESCRIPTION = ("Tokenise documents with GPT-2's tokenizer (<|endoftext|> before each) into uint16 token shards + "
               "manifest.json. The first --val_tokens tokens are the validation split, whatever --max_tokens is. "
               "Interrupted? Run the same command again: it keeps the finished shards and continues.")
def parse_count(s: str) -> int:
    """'100M', '10B', '1e8', '20000', '1_000' -> int (argparse type)."""
    t = s.strip().replace("_", "").replace(",", "")
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(t[-1:].lower(), 1)
    if mult != 1:
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a count (examples: 20000, 100M, 1e8, 10B)") from None
    if not v.is_integer() or v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole, non-negative count")
    return int(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="'embedded' (Python's help topics), local .txt (one document per file) / .jsonl / .parquet "
                        "files, folders or globs (comma-separated), or a HuggingFace dataset id (streamed).")
    p.add_argument("--source_config", default=None,
                   help=f"HF dataset config name (default: {DEFAULT_SOURCE_CONFIG} for {DEFAULT_SOURCE}, else none).")
    p.add_argument("--source_split", default="train", help="HF dataset split.")
    p.add_argument("--text_field", default="text", help="Field/column with the text (.jsonl/.parquet/HF).")
    p.add_argument("--output_dir", required=True, help="Folder for the shards and manifest.json.")
    p.add_argument("--shard_size", type=parse_count, default=DEFAULT_SHARD_SIZE, help="Tokens per shard.")
    p.add_argument("--val_tokens", type=parse_count, default=None,
                   help="The first N tokens of the stream are the validation split, whatever --max_tokens is "
                        "(default 100M, like build-nanogpt; embedded corpus: 20000).")
    p.add_argument("--max_tokens", type=parse_count, default=0, help="Stop after N tokens (val + train); 0: all.")
    p.add_argument("--num_proc", type=int, default=0, help="Tokenizer processes (default: one per CPU core).")
    p.add_argument("--tokenizer_file", default="",
                   help="Another gpt2.tiktoken ranks file (default: the one shipped in the package).")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        run_prepare(PrepareArgs(source=args.source, output_dir=args.output_dir, source_config=args.source_config,
                                source_split=args.source_split, text_field=args.text_field,
                                shard_size=args.shard_size, val_tokens=args.val_tokens, max_tokens=args.max_tokens,
                                num_proc=args.num_proc, tokenizer_file=args.tokenizer_file,
                                progress=not args.no_progress))
    except KeyboardInterrupt:
        # Finished shards and the manifest are always consistent: the same command continues from them.
        print(f"\ninterrupted: run the same command again to finish {args.output_dir}", file=sys.stderr)
        return 130
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``prepare-data`` subcommand."""
    p = subparsers.add_parser("prepare-data", help="Tokenise a corpus into GPT-2 token shards (resumable).",
                              description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_prepare)


def main(argv: list[str] | None = None) -> None:
    """Standalone entry (``python -m hf_gpt2_train.data.prepare``), same flags as the subcommand."""
    p = argparse.ArgumentParser(prog="hf-gpt2-train prepare-data", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        code = _cmd_prepare(args)
    except ConfigError as e:
        print(f"hf-gpt2-train: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
