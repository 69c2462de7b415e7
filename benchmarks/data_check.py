"""What checking the data costs at the start of a run, and that reading it per step costs nothing more.

A folder of our format (``prepare-data``'s shards and manifest, with sizes and xxh3_128 checksums, written by
its own ``ShardWriter`` from random tokens) of ``--tokens`` tokens is timed:

* ``scan``: sizes and headers of every shard (``shards.scan``: what every process does at every start);
* ``checksums_cached``: every byte hashed from the page cache (``verify.checksum_problems``, the code of
  ``data verify --checksums`` and of the default start check on a new copy of the data);
* ``checksums_disk``: the same after the folder's pages were dropped from the page cache
  (``posix_fadvise(DONTNEED)`` on its files only), i.e. a copy that was not read since it was written;
* ``remembered``: the start check of a copy whose checksums matched before (``resolve_data_dir``, file stamps);
* ``next_batch``: ``TrainLoader.next_batch()`` (seq_len 1024, 16 sequences, shuffled), the per-step read, after
  every page of the stream was touched once (the steady state of a long run; first touches are page faults).

Run it twice with ``PYTHONPATH`` pointing at two checkouts to compare the per-step read of both (the other
figures need this version); each run prints one JSON line. Usage:
``python benchmarks/data_check.py --dir /tmp/data_check [--tokens 1e9] [--batches 2000] [--only_loader]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def build(root: Path, tokens: int, shard_size: int) -> None:
    """Our format from random tokens, through prepare-data's own writer (so the manifest is the real one)."""
    import numpy as np

    from hf_gpt2_train.data.shard_writer import INITIAL, ShardWriter
    from hf_gpt2_train.data.shards import FORMAT_NAME, FORMAT_VERSION
    from hf_gpt2_train.data.tokenizer import GPT2_VOCAB_HASH

    root.mkdir(parents=True)
    m = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_hash": GPT2_VOCAB_HASH,
         "dtype": "uint16", "settings": {}, "complete": False, "tokens": {"val": 0, "train": 0}, "documents": 0,
         "shards": [], "resume": dict(INITIAL)}
    writer = ShardWriter(root, m, shard_size // 10, shard_size, tokens, INITIAL, 0)
    rng = np.random.default_rng(0)
    step = 50_000_000
    for at in range(0, tokens, step):
        n = min(step, tokens - at)
        writer.add(None, rng.integers(0, 50257, n, dtype=np.uint16), np.array([n]), 0)
    writer.finish()


def drop_cache(root: Path) -> None:
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--shard_size", type=float, default=1e8)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--only_loader", action="store_true", help="Time next_batch only (works with older versions).")
    args = ap.parse_args()
    root = Path(args.dir)
    import hf_gpt2_train

    out: dict = {"code": str(Path(hf_gpt2_train.__file__).parent.parent)}
    if not args.only_loader:
        from hf_gpt2_train.config import DataConfig
        from hf_gpt2_train.data.loader import resolve_data_dir
        from hf_gpt2_train.data.shards import scan
        from hf_gpt2_train.data.verify import checksum_problems

        if not root.exists():
            build(root, int(args.tokens), int(args.shard_size))
        shards = scan(root)
        size = sum(p.stat().st_size for p in root.glob("*.npy"))
        out.update(shards=len(shards.shards), gigabytes=size / 1e9)
        out["scan_s"] = timed(lambda: scan(root), 5)
        checksum_problems(shards, remembered=False)  # into the page cache
        out["checksums_cached_s"] = timed(lambda: checksum_problems(shards, remembered=False), 3)

        def cold() -> None:
            drop_cache(root)
            t0 = time.perf_counter()
            checksum_problems(shards, remembered=False)
            cold.seconds.append(time.perf_counter() - t0)

        cold.seconds = []
        for _ in range(2):
            cold()
        out["checksums_disk_s"] = min(cold.seconds)
        out["checksums_cached_gb_s"] = size / 1e9 / out["checksums_cached_s"]
        out["checksums_disk_gb_s"] = size / 1e9 / out["checksums_disk_s"]
        time.sleep(2.1)  # files younger than 2 s are not remembered
        resolve_data_dir(DataConfig(data_dir=str(root)))
        out["remembered_s"] = timed(lambda: resolve_data_dir(DataConfig(data_dir=str(root))), 5)

    from hf_gpt2_train.data.loader import TrainLoader

    loader = TrainLoader(root, 1024, 16, 0, 1, seed=0, shuffle=True)
    for a in loader.stream.arrays:
        int(a[::2048].sum())  # map every page once: the timing is the steady state, not first-touch page faults
    for _ in range(50):
        loader.next_batch()
    per = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.batches // 5):
            loader.next_batch()
        per.append((time.perf_counter() - t0) / (args.batches // 5))
    out["next_batch_us"] = 1e6 * statistics.median(per)
    out["next_batch_us_all"] = [round(1e6 * x, 1) for x in per]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
