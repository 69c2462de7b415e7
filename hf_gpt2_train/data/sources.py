"""Where ``prepare-data`` reads documents from, in a fixed order, resumable from a saved position.

* ``embedded``: the embedded corpus (:mod:`hf_gpt2_train.data.embedded`).
* local files, folders or globs: ``.txt`` (one document per file: a book, an article; ``prepare-data``
  adds ``<|endoftext|>`` before each), ``.jsonl`` (one JSON object per line, text in ``--text_field``;
  blank lines skipped) and ``.parquet`` (column ``--text_field``). A folder means every such file under
  it. Files are read in sorted path order.
* anything else: a HuggingFace dataset id (default ``HuggingFaceFW/fineweb-edu``, config
  ``sample-10BT``), streamed with ``datasets`` so nothing is stored twice.

``state()`` is the position right after the documents yielded so far; ``docs(state)`` continues from
it. For local files that is (file, line/row); for HF datasets it is ``IterableDataset.state_dict()``
(which resumes inside the current remote file) so a resumed preparation does not stream the whole
finished part again.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_gpt2_train.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".parquet")


class DocSource:
    """A sequence of documents (strings) in a fixed order."""

    def descriptor(self) -> dict[str, Any]:
        """What identifies the source (stored in the manifest; a resume must see the same)."""
        raise NotImplementedError

    def num_docs(self) -> int | None:
        """Number of documents, when cheaply known (for the progress bar's ETA)."""
        return None

    def docs(self, state: dict[str, Any] | None) -> Iterator[str]:
        """Documents from ``state`` (None: the start)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON-able position right after the last document ``docs`` yielded."""
        raise NotImplementedError

    def check(self) -> None:
        """Read the first document, so that bad input (missing field, bad JSON) fails before any output."""
        gen = self.docs(None)
        try:
            next(gen, None)
        finally:
            gen.close()


class EmbeddedSource(DocSource):
    def __init__(self) -> None:
        from hf_gpt2_train.data.embedded import embedded_documents, embedded_key

        self._docs = embedded_documents()
        self._key = embedded_key()
        self._next = 0

    def descriptor(self) -> dict[str, Any]:
        return {"kind": "embedded", "key": self._key}

    def num_docs(self) -> int | None:
        return len(self._docs)

    def docs(self, state: dict[str, Any] | None) -> Iterator[str]:
        self._next = int(state["doc"]) if state else 0
        while self._next < len(self._docs):
            self._next += 1
            yield self._docs[self._next - 1]

    def state(self) -> dict[str, Any]:
        return {"doc": self._next}


# Suffixes that mark a --source as a local file even when it does not exist (so a typo reports a missing
# file rather than a failed Hub lookup). HF dataset ids are "owner/name" without such a suffix.
FILE_SUFFIXES = (*SUFFIXES, ".json", ".csv", ".tsv", ".md", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
                 ".arrow", ".npy", ".bin", ".html", ".xml", ".text")


def _looks_local(source: str) -> bool:
    return (any(c in source for c in "*?[,") or source.startswith((".", "/", "~"))
            or Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists())


def expand_local(source: str) -> list[Path]:
    """Files named by ``source`` (comma-separated paths, folders or globs), sorted; ConfigError if none."""
    files: list[Path] = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        pattern = str(Path(part).expanduser())
        if any(c in pattern for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(pattern, recursive=True) if Path(h).is_file())
            if not hits:
                raise ConfigError(f"--source {part} matches no files: check the pattern")
        else:
            p = Path(pattern)
            if not p.exists():
                raise ConfigError(f"--source {part} does not exist: pass existing .txt/.jsonl/.parquet files, "
                                  "a folder of them, a glob, 'embedded' or a HuggingFace dataset id")
            if p.is_dir():
                hits = sorted(h for h in p.rglob("*") if h.is_file() and h.suffix in SUFFIXES)
                if not hits:
                    raise ConfigError(f"--source folder {part} holds no .txt/.jsonl/.parquet files: point it at "
                                      "your text files")
            else:
                hits = [p]
        files.extend(hits)
    for f in files:
        if f.suffix not in SUFFIXES:
            raise ConfigError(f"--source file {f} has an unknown format {f.suffix or '(no suffix)'!r}: use .txt "
                              "(one document per file), .jsonl or .parquet")
    if not files:
        raise ConfigError("--source names no files: pass .txt/.jsonl/.parquet files, a folder or a glob")
    return files


class LocalFiles(DocSource):
    def __init__(self, files: list[Path], text_field: str = "text"):
        self.files = [f.resolve() for f in files]
        self.text_field = text_field
        self._pos = (0, 0)

    def descriptor(self) -> dict[str, Any]:
        return {"kind": "files", "files": [[str(f), f.stat().st_size] for f in self.files],
                "text_field": self.text_field}

    def num_docs(self) -> int | None:
        if all(f.suffix == ".txt" for f in self.files):
            return len(self.files)
        if all(f.suffix == ".parquet" for f in self.files):
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        return None

    def _field(self, obj: Any, f: Path, where: str) -> str:
        if not isinstance(obj, dict) or self.text_field not in obj:
            raise ConfigError(f"{f}{where} has no field {self.text_field!r}: pass --text_field with the name of the "
                              "text field")
        v = obj[self.text_field]
        if not isinstance(v, str):
            raise ConfigError(f"{f}{where}: field {self.text_field!r} is {type(v).__name__}, not text: pass "
                              "--text_field naming a text field")
        return v

    def _jsonl(self, fi: int, f: Path, start: int) -> Iterator[str]:
        with open(f, encoding="utf-8") as fh:
            for ln, line in enumerate(fh):
                if ln < start:
                    continue
                self._pos = (fi, ln + 1)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{f}:{ln + 1} is not valid JSON: fix the line or pass a JSON Lines "
                                      "file") from None
                yield self._field(obj, f, f":{ln + 1}")

    def _parquet(self, fi: int, f: Path, start: int) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if self.text_field not in pf.schema_arrow.names:
            raise ConfigError(f"{f} has no column {self.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}): "
                              "pass --text_field")
        row = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row + n <= start:  # whole row group already done: not even read
                row += n
                continue
            for batch in pf.iter_batches(row_groups=[rg], columns=[self.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if row <= start:
                        continue
                    self._pos = (fi, row)
                    if text is not None:
                        yield text

    def docs(self, state: dict[str, Any] | None) -> Iterator[str]:
        fi0, start0 = (int(state["file"]), int(state["doc"])) if state else (0, 0)
        for fi in range(fi0, len(self.files)):
            f = self.files[fi]
            start = start0 if fi == fi0 else 0
            self._pos = (fi, start)
            if f.suffix == ".txt":
                if start == 0:
                    try:
                        text = f.read_text(encoding="utf-8")
                    except UnicodeDecodeError:
                        raise ConfigError(f"{f} is not UTF-8 text: convert it to UTF-8") from None
                    self._pos = (fi, 1)
                    yield text
            elif f.suffix == ".jsonl":
                yield from self._jsonl(fi, f, start)
            else:
                yield from self._parquet(fi, f, start)
            self._pos = (fi + 1, 0)

    def state(self) -> dict[str, Any]:
        return {"file": self._pos[0], "doc": self._pos[1]}


class HFDataset(DocSource):
    """A HuggingFace dataset, streamed (``load_dataset(..., streaming=True)``)."""

    def __init__(self, path: str, config: str = "", split: str = "train", text_field: str = "text",
                 data_files: list[str] | None = None):
        self.path, self.config, self.split, self.text_field = path, config, split, text_field
        self.data_files = data_files
        self._ds: Any = None
        self._count = 0

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "hf", "path": self.path, "config": self.config, "split": self.split,
                             "text_field": self.text_field}
        if self.data_files:
            d["data_files"] = self.data_files
        return d

    def _open(self) -> Any:
        if self._ds is None:
            import datasets

            try:
                ds = datasets.load_dataset(self.path, name=self.config or None, split=self.split, streaming=True,
                                           data_files=self.data_files)
            except Exception as e:  # hub errors, offline mode, bad names all come as varied exception types
                msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise ConfigError(f"could not open HuggingFace dataset {self.path!r} (config {self.config!r}, split "
                                  f"{self.split!r}): {msg}: check the name/--source_config and the network, or "
                                  "pass local files with --source") from None
            cols = ds.column_names
            if cols is not None and self.text_field not in cols:
                raise ConfigError(f"dataset {self.path!r} has no column {self.text_field!r} (columns: "
                                  f"{', '.join(cols)}): pass --text_field")
            if cols is not None and len(cols) > 1:
                ds = ds.select_columns([self.text_field])
            self._ds = ds
        return self._ds

    def num_docs(self) -> int | None:
        try:
            info = self._open().info.splits
            return int(info[self.split].num_examples) if info and self.split in info else None
        except Exception:
            return None

    def docs(self, state: dict[str, Any] | None) -> Iterator[str]:
        ds = self._open()
        self._count = int(state["docs"]) if state else 0
        if state and state.get("hf") is not None:
            ds.load_state_dict(state["hf"])
        elif state:  # no resumable state from this dataset: skip the documents already done
            ds = ds.skip(self._count)
        for row in ds:
            self._count += 1
            text = row[self.text_field]
            if text is not None:
                yield text

    def state(self) -> dict[str, Any]:
        st: Any = None
        if self._ds is not None:
            try:
                st = self._ds.state_dict()
                json.dumps(st)
            except Exception:  # not every dataset type has a JSON-able state: fall back to skipping
                st = None
        return {"docs": self._count, "hf": st}


def open_source(source: str, source_config: str = "", source_split: str = "train",
                text_field: str = "text") -> DocSource:
    """``embedded``, local files/folders/globs, or a HuggingFace dataset id."""
    if source == "embedded":
        return EmbeddedSource()
    if _looks_local(source):
        return LocalFiles(expand_local(source), text_field)
    return HFDataset(source, source_config, source_split, text_field)
