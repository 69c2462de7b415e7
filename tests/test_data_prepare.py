"""prepare-data on real text: shard contents, the pinned val split, formats, kill -9 resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare
from hf_gpt2_train.data.tokenizer import EOT, get_encoding

PREPARE = [sys.executable, "-m", "hf_gpt2_train.data.prepare"]


@pytest.fixture(scope="module")
def paragraphs(shared_data: Path) -> list[str]:
    """tinyshakespeare as documents: one per blank-line separated speech."""
    return [p for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def stream_of(docs: list[str]) -> np.ndarray:
    """What build-nanogpt writes: EOT then encode_ordinary(doc), for every doc in order."""
    enc = get_encoding()
    ids: list[int] = []
    for d in docs:
        ids.append(EOT)
        ids.extend(enc.encode_ordinary(d))
    return np.array(ids, dtype=np.uint16)


def read_split(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.load(out / s["file"]) for s in m["shards"] if s["split"] == split]
    assert all(p.dtype == np.uint16 for p in parts)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def prepare(**kw) -> Path:
    return run_prepare(PrepareArgs(progress=False, **kw))


def test_shards_hold_the_eot_separated_stream_split_at_val_tokens(tmp_path: Path, paragraphs: list[str]) -> None:
    docs = paragraphs[:1500]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare(source=str(src), output_dir=str(tmp_path / "out"), shard_size=10_000, val_tokens=15_000,
                  num_proc=2)
    expected = stream_of(docs)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["tokenizer"] == "gpt2" and m["documents"] == len(docs)
    assert m["tokens"] == {"val": 15_000, "train": len(expected) - 15_000}
    assert [s["file"] for s in m["shards"]][:3] == ["val_000000.npy", "val_000001.npy", "train_000000.npy"]
    assert [s["tokens"] for s in m["shards"] if s["split"] == "val"] == [10_000, 5_000]
    assert all(s["tokens"] == 10_000 for s in m["shards"][2:-1]) and 0 < m["shards"][-1]["tokens"] <= 10_000
    assert np.array_equal(read_split(out, "val"), expected[:15_000])
    assert np.array_equal(read_split(out, "train"), expected[15_000:])
    assert (expected == EOT).sum() == len(docs)

    # The output does not depend on the number of tokenizer processes.
    one = prepare(source=str(src), output_dir=str(tmp_path / "one"), shard_size=10_000, val_tokens=15_000,
                  num_proc=1)
    assert tree_bytes(one) == tree_bytes(out)


def test_val_split_is_pinned_whatever_max_tokens(tmp_path: Path, paragraphs: list[str]) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:2000])
    small = prepare(source=str(src), output_dir=str(tmp_path / "small"), shard_size=7_000, val_tokens=12_345,
                    max_tokens=30_000, num_proc=1)
    full = prepare(source=str(src), output_dir=str(tmp_path / "full"), shard_size=7_000, val_tokens=12_345,
                   num_proc=1)
    assert np.array_equal(read_split(small, "val"), read_split(full, "val"))
    assert len(read_split(small, "val")) == 12_345
    assert len(read_split(small, "train")) == 30_000 - 12_345  # stops exactly at --max_tokens
    assert np.array_equal(read_split(small, "train"), read_split(full, "train")[: 30_000 - 12_345])


def test_txt_is_one_document_per_file_and_parquet_matches_jsonl(tmp_path: Path, shared_data: Path,
                                                                 paragraphs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (shared_data / "tinyshakespeare.txt").read_text()
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(text[:300_000])
    (books / "b.txt").write_text(text[300_000:500_000])
    out = prepare(source=str(books), output_dir=str(tmp_path / "txt"), shard_size=50_000, val_tokens=5_000)
    expected = stream_of([text[:300_000], text[300_000:500_000]])
    assert np.array_equal(np.concatenate([read_split(out, "val"), read_split(out, "train")]), expected)

    docs = paragraphs[:1200]
    pq.write_table(pa.table({"content": docs[:700]}), tmp_path / "part-0.parquet", row_group_size=100)
    pq.write_table(pa.table({"content": docs[700:]}), tmp_path / "part-1.parquet", row_group_size=100)
    write_jsonl(tmp_path / "docs.jsonl", docs, field="content")
    a = prepare(source=str(tmp_path / "part-*.parquet"), text_field="content", output_dir=str(tmp_path / "pq"),
                shard_size=8_000, val_tokens=3_000)
    b = prepare(source=str(tmp_path / "docs.jsonl"), text_field="content", output_dir=str(tmp_path / "js"),
                shard_size=8_000, val_tokens=3_000)
    for split in ("val", "train"):
        assert np.array_equal(read_split(a, split), read_split(b, split))
    assert np.array_equal(np.concatenate([read_split(a, "val"), read_split(a, "train")]), stream_of(docs))


def test_hf_streaming_source_resumes_and_matches_local(tmp_path: Path, paragraphs: list[str]) -> None:
    """The HF path (datasets streaming, IterableDataset.state_dict resume), on the packaged json builder."""
    from hf_gpt2_train.data.sources import HFDataset, LocalFiles

    docs = paragraphs[:800]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    ds = HFDataset("json", split="train", data_files=[str(src)])
    it = ds.docs(None)
    head = [next(it) for _ in range(311)]
    state = json.loads(json.dumps(ds.state()))  # what the manifest stores
    rest = list(HFDataset("json", split="train", data_files=[str(src)]).docs(state))
    assert head + rest == docs

    hf_out = run_prepare(PrepareArgs(output_dir=str(tmp_path / "hf"), shard_size=9_000, val_tokens=4_000,
                                     num_proc=1, progress=False),
                         source=HFDataset("json", split="train", data_files=[str(src)]))
    local_out = run_prepare(PrepareArgs(output_dir=str(tmp_path / "local"), shard_size=9_000, val_tokens=4_000,
                                        num_proc=1, progress=False), source=LocalFiles([src]))
    for split in ("val", "train"):
        assert np.array_equal(read_split(hf_out, split), read_split(local_out, split))


def _manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path: Path, paragraphs: list[str]) -> None:
    src = write_jsonl(tmp_path / "corpus.jsonl", paragraphs * 3)  # ~1M tokens, ~32 shards
    out = tmp_path / "killed"
    args = ["--source", str(src), "--output_dir", str(out), "--shard_size", "32000", "--val_tokens", "20000",
            "--num_proc", "2"]
    shards_at_kill = []
    for _ in range(2):  # killed twice, at different places
        log = open(tmp_path / "log.txt", "w")
        proc = subprocess.Popen([*PREPARE, *args], stdout=log, stderr=log, start_new_session=True)
        target = (len(_manifest(out)["shards"]) if _manifest(out) else 0) + 4
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            m = _manifest(out)
            if m and len(m["shards"]) >= target:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the prepare process and its tokenizer workers
        proc.wait()
        log.close()
        m = _manifest(out)
        assert m is not None and not m["complete"], "the run finished before it could be killed"
        shards_at_kill.append(len(m["shards"]))
    assert shards_at_kill[1] > shards_at_kill[0]

    proc = subprocess.run([*PREPARE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"({shards_at_kill[1]} shards done)" in proc.stdout  # it resumed, not restarted

    ref = prepare(source=str(src), output_dir=str(tmp_path / "ref"), shard_size=32000, val_tokens=20000, num_proc=1)
    assert tree_bytes(out) == tree_bytes(ref)
    assert np.array_equal(np.concatenate([read_split(out, "val"), read_split(out, "train")]),
                          np.tile(stream_of(paragraphs), 3))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PREPARE, "--no_progress", *args], capture_output=True, text=True, timeout=120)


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for name, data in tree_bytes(d).items():
        h.update(name.encode() + data)
    return h.hexdigest()


def test_bad_input_is_one_line_exit_2_and_nothing_clobbered(tmp_path: Path, paragraphs: list[str]) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:300])
    (tmp_path / "table.csv").write_text("text\nhello\n")
    existing = prepare(source="embedded", output_dir=str(tmp_path / "embedded"))
    before = _digest(existing)
    notours = tmp_path / "notours"
    notours.mkdir()
    (notours / "keep.txt").write_text("user data")
    cases = [
        (["--source", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o1")], "does not exist"),
        (["--source", str(tmp_path / "table.csv"), "--output_dir", str(tmp_path / "o2")], "unknown format"),
        (["--source", str(src), "--output_dir", str(existing)], "other settings"),
        (["--source", str(src), "--output_dir", str(notours)], "not empty"),
        (["--source", str(src), "--text_field", "body", "--output_dir", str(tmp_path / "o3")], "--text_field"),
        (["--source", str(src), "--max_tokens", "1000", "--val_tokens", "5000", "--output_dir", str(tmp_path / "o4")],
         "--max_tokens"),
        # a Hub dataset that cannot be reached (conftest sets HF_DATASETS_OFFLINE=1)
        (["--source", "no-such-org/no-such-dataset", "--output_dir", str(tmp_path / "o5")], "network"),
    ]
    procs = [subprocess.Popen([*PREPARE, "--no_progress", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, _ in cases]
    for (args, needle), p in zip(cases, procs, strict=True):
        stdout, stderr = p.communicate(timeout=120)
        proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in lines[0], lines[0]
    assert _digest(existing) == before
    assert (notours / "keep.txt").read_text() == "user data" and len(list(notours.iterdir())) == 1
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / o).exists()

    # Re-running a finished preparation changes nothing.
    proc = _run_cli("--source", "embedded", "--output_dir", str(existing))
    assert proc.returncode == 0 and _digest(existing) == before
