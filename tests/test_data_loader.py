"""The train loader's global stream: exactly-once epochs across ranks, world-size-free resume, seeded shuffle."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.loader import TrainLoader, permute, val_batches
from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare

SEQ, B = 32, 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """~12k train tokens of tinyshakespeare (documents = speeches) split over 4 shards, 6k val tokens."""
    root = tmp_path_factory.mktemp("loader")
    docs = [p for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:400]
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return run_prepare(PrepareArgs(source=str(src), output_dir=str(root / "shards"), shard_size=3_500,
                                   val_tokens=6_000, max_tokens=18_000, num_proc=1, progress=False,
                                   verbose=False))


def train_tokens(d: Path) -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    return np.concatenate([np.load(d / s["file"]) for s in m["shards"] if s["split"] == "train"]).astype(np.int64)


def all_windows(d: Path) -> Counter:
    t = train_tokens(d)
    n = (len(t) - 1) // SEQ
    return Counter(t[i * SEQ:(i + 1) * SEQ + 1].tobytes() for i in range(n))


def steps(loaders: list[TrainLoader], accum: int, n: int) -> list[torch.Tensor]:
    """``n`` optimizer steps: per step, the rows of every micro-batch of every rank (rank-major per micro-step)."""
    out = []
    for _ in range(n):
        rows = []
        for _ in range(accum):
            rows.extend(ld.next_batch() for ld in loaders)
        out.append(torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in rows]))  # full windows
    return out


def test_every_window_read_exactly_once_per_epoch_across_ranks(data_dir: Path) -> None:
    ranks = [TrainLoader(data_dir, SEQ, B, r, 2, seed=7, shuffle=True) for r in range(2)]
    n = ranks[0].num_windows
    assert n % (2 * B) != 0  # epochs end inside a step: the interesting case
    per_step = 2 * B
    n_steps = (3 * n) // per_step + 1
    epochs_seen = []
    seq: list[bytes] = []
    for _ in range(n_steps):
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        for x, y in ((x0, y0), (x1, y1)):
            assert x.dtype == torch.int64 and x.shape == (B, SEQ)
            assert torch.equal(y[:, :-1], x[:, 1:])  # next-token targets
        # ranks read different data
        assert not any(torch.equal(a, b) for a in x0 for b in x1)
        seq.extend(torch.cat([x, y[:, -1:]], 1)[i].numpy().tobytes() for x, y in ((x0, y0), (x1, y1)) for i in range(B))
        assert ranks[0].epoch == ranks[1].epoch
        epochs_seen.append(ranks[0].epoch)
    expected = all_windows(data_dir)
    assert sum(expected.values()) == n
    for e in range(3):  # global sequences [e*n, (e+1)*n) are epoch e: each window once
        assert Counter(seq[e * n:(e + 1) * n]) == expected
    assert seq[:n] != seq[n:2 * n]  # a new order each epoch
    assert epochs_seen[(n - 1) // per_step] == 1 and epochs_seen[-1] == 3


def test_world_size_change_resume_continues_the_same_stream(data_dir: Path) -> None:
    one = steps([TrainLoader(data_dir, SEQ, B, 0, 1, seed=3, shuffle=True)], accum=2, n=40)
    two_ranks = [TrainLoader(data_dir, SEQ, B, r, 2, seed=3, shuffle=True) for r in range(2)]
    two = steps(two_ranks, accum=1, n=11)
    for a, b in zip(one, two, strict=False):  # 2 ranks x 1 micro-step == 1 rank x 2 micro-steps
        assert torch.equal(a, b)

    state = two_ranks[0].state_dict()
    assert state == two_ranks[1].state_dict()  # the position is global: no rank in it
    state = torch.load(_roundtrip(state, data_dir), weights_only=True)  # as a checkpoint stores it
    resumed = TrainLoader(data_dir, SEQ, B, 0, 1, seed=3, shuffle=True)
    resumed.load_state_dict(state)
    after = steps([resumed], accum=2, n=29)  # crosses an epoch end
    assert resumed.epoch >= 1
    for a, b in zip(one[11:], after, strict=True):
        assert torch.equal(a, b)

    # and back: a 1-process position continued on 2 processes
    back = [TrainLoader(data_dir, SEQ, B, r, 2, seed=3, shuffle=True) for r in range(2)]
    for ld in back:
        ld.load_state_dict(resumed.state_dict())
    more_one = steps([resumed], accum=2, n=5)
    for a, b in zip(more_one, steps(back, accum=1, n=5), strict=True):
        assert torch.equal(a, b)


def _roundtrip(state: dict, d: Path) -> Path:
    p = d.parent / "loader_state.pt"
    torch.save(state, p)
    return p


def test_shuffle_is_seeded_and_restored(data_dir: Path) -> None:
    def first(seed: int, shuffle: bool, k: int = 30) -> list[torch.Tensor]:
        return steps([TrainLoader(data_dir, SEQ, B, 0, 1, seed=seed, shuffle=shuffle)], 1, k)

    a, b, c = first(1, True), first(1, True), first(2, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # unshuffled: the stream in order
    plain = torch.cat(first(1, False, 3))
    t = torch.from_numpy(train_tokens(data_dir))
    for i in range(len(plain)):
        assert torch.equal(plain[i], t[i * SEQ:(i + 1) * SEQ + 1])
    # the checkpoint's seed wins on resume (the saved order continues)
    ld = TrainLoader(data_dir, SEQ, B, 0, 1, seed=1, shuffle=True)
    steps([ld], 1, 10)
    other = TrainLoader(data_dir, SEQ, B, 0, 1, seed=99, shuffle=False)
    other.load_state_dict(ld.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(steps([other], 1, 20), a[10:], strict=True))


def test_permutation_is_a_bijection_with_constant_memory() -> None:
    for n in (1, 2, 3, 7, 64, 65, 1000, 4097):
        for epoch in (0, 1):
            p = permute(np.arange(n), n, seed=5, epoch=epoch)
            assert np.array_equal(np.sort(p), np.arange(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 5, 0), permute(np.arange(1000), 1000, 5, 1))
    # 10**13 windows (far more than any dataset): one batch's indices cost kilobytes, not a permutation table
    tracemalloc.start()
    p = permute(np.arange(10**13 - 64, 10**13), 10**13, seed=5, epoch=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(p.tolist())) == 64 and p.min() >= 0 and p.max() < 10**13
    assert peak < 1_000_000


def test_loader_memory_does_not_grow_with_the_dataset(tmp_path: Path, data_dir: Path) -> None:
    base = train_tokens(data_dir).astype(np.uint16)
    peaks = []
    for copies in (2, 200):  # ~25k vs ~2.5M tokens, nanogpt-format shards
        d = tmp_path / f"x{copies}"
        d.mkdir()
        big = np.tile(base, copies)
        for i, part in enumerate(np.array_split(big, 4)):
            np.save(d / f"edufineweb_train_{i:06d}.npy", part)
        del big
        tracemalloc.start()
        ld = TrainLoader(d, SEQ, B, 0, 1, seed=0, shuffle=True)
        for _ in range(20):
            ld.next_batch()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5 + 100_000, peaks


def test_val_batches_fixed_disjoint_and_world_size_free(data_dir: Path) -> None:
    one = val_batches(data_dir, SEQ, B, n_batches=4, rank=0, world_size=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, val_batches(data_dir, SEQ, B, 4, 0, 1), strict=True))
    r0, r1 = (val_batches(data_dir, SEQ, B, n_batches=2, rank=r, world_size=2) for r in range(2))
    rows = lambda bs: Counter(r.numpy().tobytes() for x, _ in bs for r in x)  # noqa: E731
    assert not (rows(r0) & rows(r1))  # disjoint parts
    assert rows(r0) + rows(r1) == rows(one)  # of the same global set
    # a val split too small for the request: every rank gets the same smaller count
    few = [val_batches(data_dir, SEQ, B, n_batches=1000, rank=r, world_size=2) for r in range(2)]
    assert len(few[0]) == len(few[1]) == (6_000 - 1) // SEQ // (2 * B)
    with pytest.raises(ConfigError, match="val_batches|per_device_train_batch_size"):
        val_batches(data_dir, SEQ, 200, n_batches=1, rank=0, world_size=1)


def test_resume_with_other_data_or_seq_len_is_refused(data_dir: Path) -> None:
    ld = TrainLoader(data_dir, SEQ, B, 0, 1, seed=0, shuffle=True)
    ld.next_batch()
    other = TrainLoader(data_dir, SEQ * 2, B, 0, 1, seed=0, shuffle=True)
    with pytest.raises(ConfigError, match="--seq_len"):
        other.load_state_dict(ld.state_dict())
