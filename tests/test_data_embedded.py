"""The embedded corpus: prepared on first use into the cache, atomically, once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_gpt2_train.config import DataConfig
from hf_gpt2_train.data.embedded import EMBEDDED_VAL_TOKENS, embedded_documents
from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir, val_batches
from hf_gpt2_train.data.tokenizer import EOT, get_encoding

# What resolve_data_dir("") runs first (without importing torch, so that the processes start fast).
RESOLVE = "from hf_gpt2_train.data.embedded import ensure_embedded; print(ensure_embedded())"


def test_first_use_prepares_python_help_topics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path / "cache"))
    d = resolve_data_dir(DataConfig())
    assert d.parent == tmp_path / "cache" / "embedded"
    docs = embedded_documents()
    assert len(docs) >= 70 and sum(map(len, docs)) > 300_000  # ~79 English help topics, ~465k chars
    enc = get_encoding()
    expected = np.concatenate([np.array([EOT] + enc.encode_ordinary(t), dtype=np.uint16) for t in docs])
    m = json.loads((d / "manifest.json").read_text())
    got = np.concatenate([np.load(d / s["file"]) for s in m["shards"]])
    assert np.array_equal(got, expected)
    assert m["tokens"]["val"] == EMBEDDED_VAL_TOKENS and m["documents"] == len(docs)

    # The quickstart's shapes work on it, on 1 or 2 processes (seq_len 128, micro-batch 16, 4 val batches).
    for world in (1, 2):
        assert len(val_batches(d, 128, 16, 4, world - 1, world)) == 4
    x, y = TrainLoader(d, 128, 16, 0, 1, seed=1337, shuffle=True).next_batch()
    assert x.shape == (16, 128) and enc.decode(x[0].tolist())  # real text

    # Later uses reuse it untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert resolve_data_dir(DataConfig()) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == mtimes


def test_concurrent_and_interrupted_first_use(tmp_path: Path) -> None:
    env = {**os.environ, "HF_GPT2_TRAIN_CACHE": str(tmp_path / "cache")}
    parent = tmp_path / "cache" / "embedded"
    # kill -9 a first use while it writes its temporary folder
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and not list(parent.glob(".tmp-*")):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if list(parent.glob(".tmp-*")) and not list(parent.glob("pydoc-*")):
            break
    else:
        pytest.fail("could not interrupt a first use before it finished")

    # two processes now race to prepare it (rank 0 and rank 1 of a launch)
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    d = Path(paths.pop())
    assert json.loads((d / "manifest.json").read_text())["complete"]
    assert [p.name for p in parent.iterdir()] == [d.name]  # the killed run's temp folder was cleaned up
