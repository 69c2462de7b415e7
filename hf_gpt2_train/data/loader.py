"""Training and validation batches from memory-mapped token shards, at a global, resumable position.

**Windows.** A split's shards are concatenated (manifest / file-name order) into one token stream of
``T`` tokens, cut into ``N = (T - 1) // seq_len`` windows of ``seq_len + 1`` tokens that advance by
``seq_len``: window ``w`` is tokens ``[w*seq_len, w*seq_len + seq_len]``, ``x = w[:-1]``, ``y = w[1:]``.
Windows cross shard ends freely, so within an epoch every token is an input exactly once (only the
``< seq_len`` tokens after the last full window are unused, and no token is lost at shard ends).

**Order.** Epoch ``e`` visits the windows in the order ``perm_e(0), perm_e(1), ...`` where ``perm_e`` is
a keyed 4-round Feistel permutation of ``[0, N)`` (cycle-walking on the next power of four), keyed by
sha256 of ``(seed, e)``; without shuffle it is the identity. The permutation is computed per batch
from the indices alone: nothing proportional to the dataset is ever materialised, so memory does not
grow with the data. (Fully random windows over memory-mapped shards read 2 KB pieces at random
offsets, as nanoGPT's sampler does; the page cache and SSDs handle that well.)

**Position.** The loader's state is one global sequence counter ``g`` (stored as ``epoch = g // N``,
``cursor = g % N``), independent of the number of processes. Each ``next_batch()`` on rank ``r`` of
``W`` returns global sequences ``[g + r*B, g + (r+1)*B)`` and advances ``g`` by ``W*B`` on every rank.
An epoch ends in the middle of a batch when ``N`` is not a multiple of ``W*B``: that batch takes the
last windows of epoch ``e`` and the first of epoch ``e+1`` (so no window is dropped or repeated and the
stream is the same for every world size). Hence a resume with another world size and the same global
batch continues the exact same sequence of optimizer-step batches.

**Skipped ranges.** After a spike rollback (resilience/rollback.py) the global sequences a bad stretch read,
``[first, end)``, are never read again: when ``g`` reaches such a range it jumps to its end. The ranges are
part of the loader's state, so a later resume skips them too. They are recorded at optimizer-step
boundaries, which stay boundaries for any world size with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_gpt2_train.config import ConfigError, DataConfig
from hf_gpt2_train.data.shards import ShardSet, TokenStream
from hf_gpt2_train.data.verify import check_data_dir, identity_difference

log = logging.getLogger(__name__)
STATE_VERSION = 1


def resolve_data_dir(cfg: DataConfig, state: Any = None) -> Path:
    """The shard folder to train on, every shard checked (data/verify.py); ``""`` prepares the embedded corpus once
    into the cache.

    Raises ConfigError (naming the fix) for a missing or empty folder, an unfinished preparation, shards made
    with another tokenizer, a damaged shard, or a folder without training tokens. ``state``: the launch's
    ``PartialState``; with several processes each checks what it sees (sizes on every process, checksums on one
    per machine) and all stop together on the first problem any of them found, printed once.
    """
    problem, identity, root = None, None, Path(cfg.data_dir).expanduser()
    try:
        if not cfg.data_dir:
            from hf_gpt2_train.data.embedded import ensure_embedded

            root = ensure_embedded(cfg.tokenizer_file)
        hashing = cfg.verify_data_checksums and (state is None or state.is_local_main_process)
        shards = check_data_dir(root, checksums=hashing)
        if shards.tokens("train") == 0:
            raise ConfigError(f"data dir {root} has no training tokens (only {shards.tokens('val'):,} val tokens): "
                              "prepare it again with a smaller --val_tokens or add train shards")
        identity = hashlib.sha256(json.dumps(shards.identity()).encode()).hexdigest()
    except ConfigError as e:
        if state is None or state.num_processes == 1:
            raise
        problem = str(e)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        views = gather_object([(problem, identity, socket.gethostname())])
        first = next((v for v in views if v[0]), None)
        if first is not None:
            problem = first[0] if first[2] == views[0][2] else f"on {first[2]}: {first[0]}"
        elif any(v[1] != views[0][1] for v in views):  # machines with copies of their own that differ
            other = next(v for v in views if v[1] != views[0][1])[2]
            problem = (f"the processes read different data from {root}: {views[0][2]} and {other} see other shards "
                       f"(compare `hf-gpt2-train data verify {root}` on both): give every machine the same copy")
        if problem:
            raise ConfigError(problem, every_process=True)
    return root


# ------------------------------------------------------------------------------------- permutation
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing 64-bit hash (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def permute(idx: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """``perm(idx)`` for a pseudo-random permutation of ``[0, n)`` determined by ``(seed, epoch)``."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half >= n, so < 4 walks per index on average
    mask = np.uint64((1 << half) - 1)
    keys = np.frombuffer(hashlib.sha256(f"hf-gpt2-train:{seed}:{epoch}".encode()).digest(), dtype="<u8")

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(np.asarray(idx, dtype=np.uint64))
    bad = out >= np.uint64(n)
    while bad.any():  # cycle-walking: re-encrypt until inside [0, n); a bijection on [0, n) by construction
        out[bad] = feistel(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


# ------------------------------------------------------------------------------------------ loaders
def _split_stream(shards: ShardSet, split: str, seq_len: int) -> tuple[TokenStream, int]:
    stream = TokenStream(shards.split(split))
    return stream, max(0, (stream.total - 1) // seq_len)


def _to_xy(tokens: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 inputs and targets. ``pin_memory``: written straight into page-locked host memory (the one copy
    that is made anyway), so that ``.to("cuda", non_blocking=True)`` is a real asynchronous DMA and the host
    goes on queueing kernels; from pageable memory CUDA stages the copy and the host waits for it."""
    if not pin_memory:
        return (torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])))
    b, t = tokens.shape[0], tokens.shape[1] - 1
    x = torch.empty((b, t), dtype=torch.int64, pin_memory=True)
    y = torch.empty((b, t), dtype=torch.int64, pin_memory=True)
    x.numpy()[:] = tokens[:, :-1]
    y.numpy()[:] = tokens[:, 1:]
    return x, y


class TrainLoader:
    """This rank's micro-batches of the training split (see the module docstring for the semantics)."""

    def __init__(self, data_dir: Path, seq_len: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, pin_memory: bool = False, other_data_ok: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data_dir = Path(data_dir)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.pin_memory = pin_memory
        """Return batches in page-locked memory (for CUDA: the trainer sets it when the device is a GPU)."""
        self.other_data_ok = other_data_ok
        """A resume may continue the position on other data with as many windows (--resume_on_other_data)."""
        shards = check_data_dir(self.data_dir)  # sizes and headers (resolve_data_dir checked the bytes)
        self.data = shards.identity()
        """What the data is (shard names, token counts, checksums), kept in the state: a resume checks it."""
        self.stream, self.num_windows = _split_stream(shards, "train", seq_len)
        if self.num_windows < 1:
            raise ConfigError(f"the training split of {self.data_dir} has {self.stream.total} tokens, fewer than "
                              f"seq_len+1 = {seq_len + 1}: use more data or a smaller --seq_len")
        self.epoch = 0
        """Epoch of the next sequence to be read."""
        self.cursor = 0
        """Index (in epoch order) of the next sequence to be read, global over all ranks."""
        self.skipped: list[tuple[int, int]] = []
        """Global sequence ranges ``[first, end)`` never to be read (sorted, disjoint)."""

    @property
    def position(self) -> int:
        """Global index of the next sequence to be read (``epoch * num_windows + cursor``)."""
        return self.epoch * self.num_windows + self.cursor

    def skip(self, ranges: list[tuple[int, int]]) -> None:
        """Never read the global sequences in ``ranges`` (merged with those already skipped)."""
        merged: list[tuple[int, int]] = []
        for a, b in sorted({(int(a), int(b)) for a, b in [*self.skipped, *ranges] if b > a}):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.skipped = merged
        self._move_to(self.position)

    def _move_to(self, g: int) -> None:
        for a, b in self.skipped:
            if a <= g < b:
                g = b
        self.epoch, self.cursor = divmod(g, self.num_windows)

    @property
    def tokens_per_epoch(self) -> int:
        return self.num_windows * self.seq_len

    def window_indices(self, first: int, count: int) -> np.ndarray:
        """Window ids of global sequences ``first .. first+count-1`` (global = epoch * N + cursor)."""
        g = first + np.arange(count, dtype=np.int64)
        epochs, pos = np.divmod(g, self.num_windows)
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = permute(pos[sel], self.num_windows, self.seed, int(e))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(micro_batch_size, seq_len)`` inputs and next-token targets for this rank's next micro-step."""
        b = self.micro_batch_size
        g = self.position
        windows = self.window_indices(g + self.rank * b, b)
        tokens = self.stream.read(windows * self.seq_len, self.seq_len + 1)
        self._move_to(g + self.world_size * b)
        return _to_xy(tokens, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        """The global position (no rank or world size in it) plus what must match on resume."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "num_windows": self.num_windows,
                "train_tokens": self.stream.total, "skipped": [list(r) for r in self.skipped], "data": self.data}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue the saved stream: position, seed and shuffle come from ``d`` (the saved order wins).

        ConfigError (the same on every process) when ``d`` was saved with another --seq_len or other data: other
        shards, token counts or (where both record checksums) bytes; the same files in another folder are the
        same data. States saved before the data's identity was kept are checked by token count."""
        fix = "resume with the run's own data (the same files; another folder is fine) or start a new --output_dir"
        if d.get("seq_len") != self.seq_len:
            raise ConfigError(f"the checkpoint's data position is for --seq_len {d.get('seq_len')}, not "
                              f"{self.seq_len}: resume with the run's original --seq_len", every_process=True)
        diff = identity_difference(d["data"], self.data) if d.get("data") else None
        if diff is None and d.get("train_tokens") != self.stream.total:
            diff = f"it has {self.stream.total:,} training tokens, the run's data had {d.get('train_tokens'):,}"
        if diff and self.other_data_ok and d.get("num_windows") == self.num_windows:
            log.warning("resuming on other data (--resume_on_other_data): %s; the position continues", diff)
        elif diff:
            if self.other_data_ok:
                fix = (f"it has {self.num_windows:,} training windows of --seq_len {self.seq_len}, the run's data had "
                       f"{d.get('num_windows'):,}, so the position cannot continue: start a new --output_dir")
            else:
                fix += " (or pass --resume_on_other_data true to continue the position on this data)"
            raise ConfigError(f"--data_dir {self.data_dir} is not the data the checkpoint was trained on: {diff}: "
                              f"{fix}", every_process=True)
        if d.get("seed") != self.seed or d.get("shuffle") != self.shuffle:
            log.warning("data order continues with the checkpoint's seed=%s shuffle=%s (not seed=%s shuffle=%s)",
                        d.get("seed"), d.get("shuffle"), self.seed, self.shuffle)
        self.epoch, self.cursor = int(d["epoch"]), int(d["cursor"])
        self.seed, self.shuffle = int(d["seed"]), bool(d["shuffle"])
        self.skipped = []
        self.skip([(int(a), int(b)) for a, b in d.get("skipped", [])])


def val_batches(data_dir: Path, seq_len: int, micro_batch_size: int, n_batches: int, rank: int, world_size: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of the fixed validation set: ``n_batches`` micro-batches, the same on every call.

    The global set is the first ``n_batches * world_size * micro_batch_size`` windows of the val
    stream (in order, unshuffled); batch ``k`` of rank ``r`` holds windows
    ``[(k*W + r)*B, (k*W + r + 1)*B)``, so ranks get disjoint parts and the union does not depend on how
    the same total is split across processes. A val split too short for ``n_batches`` rounds gives
    every rank the same smaller number (ranks must agree for the loss reduction).
    """
    if n_batches <= 0:
        return []
    shards = check_data_dir(Path(data_dir))
    stream, n = _split_stream(shards, "val", seq_len)
    per_round = world_size * micro_batch_size
    if not shards.split("val"):
        raise ConfigError(f"{data_dir} has no validation split: prepare it with --val_tokens > 0 (or add a shard "
                          "with 'val' in its name), or set --val_batches 0")
    rounds = min(n_batches, n // per_round)
    if rounds == 0:
        raise ConfigError(f"the validation split of {data_dir} has {stream.total:,} tokens, fewer than one batch per "
                          f"process ({per_round} x {seq_len + 1}): lower --per_device_train_batch_size or "
                          "--val_batches, or prepare more --val_tokens")
    if rounds < n_batches:
        log.warning("validation split holds only %d batches per process (asked for %d)", rounds, n_batches)
    out = []
    for k in range(rounds):
        first = (k * world_size + rank) * micro_batch_size
        windows = np.arange(first, first + micro_batch_size, dtype=np.int64)
        out.append(_to_xy(stream.read(windows * seq_len, seq_len + 1)))
    return out
