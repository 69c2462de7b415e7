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
would have produced.

**Repair.** Each shard's entry also records its size, its xxh3_128 checksum and its own start
(``shard_writer.py``). A re-run first checks every finished shard (sizes, headers, every byte against its
checksum) and re-makes the damaged or missing ones in place from their starts, each checked against its
recorded checksum (another result means the source changed: an error, nothing replaced); the intact shards
are kept. Folders prepared before starts were recorded are replayed from the beginning of the stream. Tokenisation runs in ``--num_proc`` processes over chunks of documents; results are
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
from hf_gpt2_train.data.shard_writer import INITIAL, ShardWriter
from hf_gpt2_train.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_manifest
from hf_gpt2_train.data.sources import DocSource, open_source
from hf_gpt2_train.data.tokenizer import EOT, get_encoding, vocab_hash
from hf_gpt2_train.data.verify import damaged_shards
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
    skipped: int = 0  # documents at the chunk's start done before a resume (counted, not in docs)


def _chunks(source: DocSource, start: dict[str, Any] | None, skip_docs: int) -> Iterator[_Chunk]:
    """Chunks of documents, each tagged with the source position of its first document.

    After a resume the first chunk is the one the resume point lies in, its first ``skip_docs`` documents
    skipped but counted, so the chunks, and the resume points recorded in them (a shard's ``start``), are
    those of an uninterrupted run."""
    gen = source.docs(start)
    state, chars = start, 0
    for _ in range(skip_docs):  # documents of the resume chunk that were already done
        d = next(gen, None)
        if d is None:
            return
        chars += len(d)
    docs: list[str] = []
    skipped = skip_docs
    if skipped >= CHUNK_DOCS or chars >= CHUNK_CHARS:  # the resume point is the end of its chunk
        state, chars, skipped = source.state(), 0, 0
    for d in gen:
        docs.append(d)
        chars += len(d)
        if skipped + len(docs) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield _Chunk(state, docs, skipped)
            state = source.state()
            docs, chars, skipped = [], 0, 0
    if docs:
        yield _Chunk(state, docs, skipped)


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
    return m


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
    num_proc = args.num_proc or os.cpu_count() or 1
    if m is not None:
        for t in out.glob("*.tmp"):  # a shard or manifest a killed run was writing
            t.unlink()
        _repair(args, out, m, source, val_tokens, num_proc)
    if m is not None and m.get("complete"):
        _say(args, f"{out} is already complete ({m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens)")
        return out
    if m is None:
        out.mkdir(parents=True, exist_ok=True)
        m = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": enc.name, "vocab_hash": vocab_hash(enc),
             "dtype": "uint16", "settings": settings, "complete": False, "tokens": {"val": 0, "train": 0},
             "documents": 0, "shards": [], "resume": dict(INITIAL)}
        write_json_atomic(out / MANIFEST, m)
    else:
        _say(args, f"resuming {out} at token {m['resume']['tokens']:,} ({len(m['shards'])} shards done)")
    writer = ShardWriter(out, m, val_tokens, args.shard_size, args.max_tokens, m["resume"], len(m["shards"]))
    _feed(writer, source, m["resume"], num_proc, args.tokenizer_file, _progress_bar(args, source, writer))
    writer.finish()
    if m["tokens"]["val"] + m["tokens"]["train"] == 0:
        raise ConfigError(f"--source {args.source} holds no text: check the files / --text_field")
    if m["tokens"]["train"] == 0:
        raise ConfigError(f"all {m['tokens']['val']:,} tokens of the source went to the validation split (the first "
                          f"--val_tokens {val_tokens:,}): prepare again into a new --output_dir with a smaller "
                          "--val_tokens")
    _say(args, f"{out}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens from {m['documents']:,} "
               f"documents in {len(m['shards'])} shards")
    return out


def _feed(writer: ShardWriter, source: DocSource, start: dict[str, Any], num_proc: int, tokenizer_file: str,
          bar: Any = None) -> None:
    """Tokenise the source from the resume point ``start`` into ``writer`` until it is done or the source ends."""
    first = start["skip_tokens"]
    t0, pos0 = time.time(), writer.pos
    results = _tokenized(_chunks(source, start["source_state"], start["skip_docs"]), num_proc, tokenizer_file)
    try:
        for chunk, tokens, lens in results:
            before, docs_before = writer.pos, writer.docs
            writer.add(chunk.state, tokens, lens, first, chunk.skipped)
            first = 0
            if bar is not None:
                bar.update((writer.pos - before) if bar.unit == "tok" else (writer.docs - docs_before))
                bar.set_postfix_str(f"{writer.pos / 1e6:,.1f}M tok, {writer.docs:,} docs, "
                                    f"{(writer.pos - pos0) / max(time.time() - t0, 1e-9) / 1e3:,.0f}k tok/s, "
                                    f"{len(writer.m['shards'])} shards", refresh=False)
            if writer.done:
                break
    finally:
        results.close()  # stops the tokenizer processes at once (also on errors)
        if bar is not None:
            bar.close()


def _repair(args: PrepareArgs, out: Path, m: dict[str, Any], source: DocSource, val_tokens: int,
            num_proc: int) -> None:
    """Re-make the damaged or missing shards of ``out`` in place (module docstring: Repair)."""
    damaged = damaged_shards(out, m)
    if not damaged:
        return
    for clause in damaged.values():
        _say(args, f"{clause.removeprefix('data shard ')}: re-making it")
    todo = sorted(damaged)
    while todo:
        k = todo[0]
        s = max(j for j in range(k + 1) if j == 0 or m["shards"][j].get("start"))  # the nearest recorded start
        start = m["shards"][s].get("start") or INITIAL
        writer = ShardWriter(out, m, val_tokens, args.shard_size, args.max_tokens, start, s, rewrite=set(todo))
        _feed(writer, source, start, num_proc, args.tokenizer_file)
        writer.finish()
        write_json_atomic(out / MANIFEST, m)  # sizes, checksums and starts of what the pass met
        if k not in writer.rewritten:
            raise ConfigError(f"the source ended before {m['shards'][k]['file']} could be re-made: the source "
                              "changed since it was prepared: prepare it again into a new --output_dir")
        todo = [t for t in todo if t not in writer.rewritten]
    _say(args, f"re-made {len(damaged)} shard(s) of {out}; the other {len(m['shards']) - len(damaged)} were intact")


def _say(args: PrepareArgs, msg: str) -> None:
    if args.verbose:
        print(msg, flush=True)


def _progress_bar(args: PrepareArgs, source: DocSource, writer: ShardWriter) -> Any:
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
