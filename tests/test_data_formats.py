"""Every shard format read end to end with real tokens; bad data folders give one clear error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hf_gpt2_train.config import ConfigError, DataConfig
from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir, val_batches
from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare
from hf_gpt2_train.data.tokenizer import EOT, get_encoding

LLMC_VAL_TOKENS = 32768  # llm.c's tinyshakespeare.py: the first 32,768 tokens are val


def llmc_write_datafile(filename: Path, toks: list[int] | np.ndarray) -> None:
    """llm.c dev/data/data_common.py write_datafile for gpt-2 (magic 20240520, version 1, uint16)."""
    assert len(toks) < 2**31
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520
    header[1] = 1
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def nanogpt_write_datafile(filename: str, tokens_np: np.ndarray) -> None:
    """build-nanogpt fineweb.py write_datafile (the name has no .npy; np.save appends it)."""
    np.save(filename, tokens_np)


@pytest.fixture(scope="module")
def sections(shared_data: Path) -> list[str]:
    """llm.c's tinyshakespeare.py documents: sections split on blank lines, '\\n\\n' kept on all but the last."""
    secs = (shared_data / "tinyshakespeare.txt").read_text().split("\n\n")
    return [s + "\n\n" if i != len(secs) - 1 else s for i, s in enumerate(secs)]


@pytest.fixture(scope="module")
def stream(sections: list[str]) -> np.ndarray:
    enc = get_encoding()
    toks: list[int] = []
    for s in sections:
        toks.append(EOT)
        toks.extend(enc.encode_ordinary(s))
    return np.array(toks, dtype=np.uint16)


@pytest.fixture(scope="module")
def format_dirs(tmp_path_factory: pytest.TempPathFactory, sections: list[str], stream: np.ndarray
                ) -> dict[str, Path]:
    """The same token stream (val = first 32,768 tokens) in all three formats."""
    root = tmp_path_factory.mktemp("formats")
    llmc = root / "llmc"
    llmc.mkdir()
    llmc_write_datafile(llmc / "tiny_shakespeare_val.bin", stream[:LLMC_VAL_TOKENS])
    llmc_write_datafile(llmc / "tiny_shakespeare_train.bin", stream[LLMC_VAL_TOKENS:])

    nano = root / "nanogpt"
    nano.mkdir()
    # build-nanogpt: shard 0 is val, then train shards; the same shard size for all (here 100k tokens)
    cuts = [0, LLMC_VAL_TOKENS, *range(LLMC_VAL_TOKENS + 100_000, len(stream), 100_000), len(stream)]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        split = "val" if i == 0 else "train"
        nanogpt_write_datafile(os.path.join(nano, f"edufineweb_{split}_{i:06d}"), stream[a:b])

    src = root / "sections.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in sections))
    ours = run_prepare(PrepareArgs(source=str(src), output_dir=str(root / "ours"), shard_size=64_000,
                                   val_tokens=LLMC_VAL_TOKENS, num_proc=1, progress=False, verbose=False))
    return {"llmc": llmc, "nanogpt": nano, "ours": ours}


@pytest.mark.parametrize("fmt", ["ours", "nanogpt", "llmc"])
def test_format_read_end_to_end(fmt: str, format_dirs: dict[str, Path], stream: np.ndarray) -> None:
    root = resolve_data_dir(DataConfig(data_dir=str(format_dirs[fmt])))
    seq_len, batch = 64, 32
    train = stream[LLMC_VAL_TOKENS:].astype(np.int64)
    n = (len(train) - 1) // seq_len
    loader = TrainLoader(root, seq_len, batch, rank=0, world_size=1, seed=0, shuffle=False)
    assert loader.num_windows == n
    assert all(isinstance(a, np.memmap) for a in loader.stream.arrays)  # memory-mapped, not loaded
    xs, ys = [], []
    while len(xs) * batch < n:
        x, y = loader.next_batch()
        assert x.shape == y.shape == (batch, seq_len) and str(x.dtype) == "torch.int64"
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    # Unshuffled, the epoch is the train stream in order: windows of seq_len+1 advancing by seq_len.
    assert np.array_equal(x.reshape(-1), train[: n * seq_len])
    assert np.array_equal(y.reshape(-1), train[1: n * seq_len + 1])
    assert loader.epoch == (len(xs) * batch) // n

    val = stream[:LLMC_VAL_TOKENS].astype(np.int64)
    vb = val_batches(root, seq_len, batch, n_batches=3, rank=0, world_size=1)
    assert len(vb) == 3
    vx = np.concatenate([b[0].numpy() for b in vb])
    assert np.array_equal(vx.reshape(-1), val[: 3 * batch * seq_len])


def test_bad_data_dirs_name_the_fix(tmp_path: Path, format_dirs: dict[str, Path]) -> None:
    def err(path: Path | str) -> str:
        with pytest.raises(ConfigError) as e:
            resolve_data_dir(DataConfig(data_dir=str(path)))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "does not exist" in err(tmp_path / "nope") and "prepare-data" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no token shards" in err(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    assert "not a folder" in err(tmp_path / "afile") or "is a file" in err(tmp_path / "afile")

    other = tmp_path / "other_tokenizer"
    shutil.copytree(format_dirs["ours"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"], m["vocab_hash"] = "cl100k_base", "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(m))
    assert "not GPT-2's" in err(other)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(format_dirs["ours"], unfinished)
    m = json.loads((unfinished / "manifest.json").read_text())
    m["complete"] = False
    (unfinished / "manifest.json").write_text(json.dumps(m))
    assert "re-run the same" in err(unfinished)

    val_only = tmp_path / "val_only"
    val_only.mkdir()
    shutil.copy(format_dirs["llmc"] / "tiny_shakespeare_val.bin", val_only)
    assert "no training tokens" in err(val_only)

    bad_magic = tmp_path / "bad_magic"
    bad_magic.mkdir()
    data = bytearray((format_dirs["llmc"] / "tiny_shakespeare_train.bin").read_bytes())
    data[0:4] = np.int32(20240801).tobytes()  # llm.c's llama-3 magic: other tokenizer
    (bad_magic / "train.bin").write_bytes(bytes(data))
    assert "magic" in err(bad_magic)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    full = (format_dirs["llmc"] / "tiny_shakespeare_train.bin").read_bytes()
    (truncated / "train.bin").write_bytes(full[: len(full) - 1000])
    assert "truncated" in err(truncated)
