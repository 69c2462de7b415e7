"""checkpoint/direct.py: model.safetensors and optimizer.bin written with O_DIRECT from reused aligned buffers.

The files are byte for byte what Accelerate's ``save`` writes, they load back (``safetensors``, ``torch.load``,
``accelerator.load_state``), and the manifest entry each writer returns is the checksum of the file as it is on
disk (recomputed here by reading it back). Buffers and checksum chunks are made small so that one file spans
many buffers and chunks and ends mid-buffer (the O_DIRECT padding is cut off). A filesystem that refuses
O_DIRECT gets buffered writes with the same bytes: on this kernel (6.x) tmpfs accepts O_DIRECT, ramfs refuses it,
so the fallback runs on a real ramfs mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hf_gpt2_train.checkpoint import atomic, direct
from hf_gpt2_train.config import ModelConfig
from hf_gpt2_train.model import build_model, lm_logits, lm_loss
from tests.test_checkpoint_manager import Harness

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=1000, pad_vocab_multiple=64)


@contextlib.contextmanager
def ramfs(path: Path) -> Iterator[Path]:
    """A real filesystem without O_DIRECT mounted on ``path`` (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a ramfs needs root")
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a ramfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def folder_on(fs: str, tmp_path: Path) -> Iterator[Path]:
    if fs == "ramfs":
        with ramfs(tmp_path / "ramfs") as p:
            yield p
    else:
        yield tmp_path


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 KiB buffers and 128 KiB checksum chunks (the real ones: 16 MiB and 64 MiB), a fresh buffer pool."""
    monkeypatch.setattr(direct, "BUFFER_BYTES", 64 << 10)
    monkeypatch.setattr(direct, "_pool", [])
    monkeypatch.setattr(atomic, "CHUNK_BYTES", 128 << 10)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT-2 (tied embeddings) and AdamW with real state after two steps."""
    model = build_model(SMALL, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, SMALL.vocab_size, (2, 17), generator=g)
        lm_loss(lm_logits(model, x[:, :-1], SMALL.vocab_size), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _entries_read_back(folder: Path, names: list[str]) -> dict:
    with ThreadPoolExecutor(2) as pool:
        return atomic.file_entries(folder, [folder / n for n in names], pool)


@pytest.mark.parametrize("fs", ["disk", "ramfs"])
def test_direct_files_equal_accelerates_and_their_entries_are_their_checksums(
        tmp_path: Path, fs: str, small_buffers: None) -> None:
    from accelerate.utils import save
    from safetensors.torch import load_file

    model, opt = _trained()
    ref = tmp_path / "reference"
    ref.mkdir()
    save(OrderedDict(model.state_dict()), ref / "model.safetensors", safe_serialization=True)
    save(opt.state_dict(), ref / "optimizer.bin", safe_serialization=False)
    with folder_on(fs, tmp_path) as folder:
        ours = folder / "ours"
        ours.mkdir()
        got = {"model.safetensors": direct.save_safetensors(OrderedDict(model.state_dict()), ours / "model.safetensors"),
               "optimizer.bin": direct.save_torch(opt.state_dict(), ours / "optimizer.bin")}
        for name in got:
            data = (ours / name).read_bytes()
            assert data == (ref / name).read_bytes(), name
            assert len(data) > 4 * atomic.CHUNK_BYTES and len(data) % direct.ALIGN, "spans chunks, ends mid-block"
        assert got == _entries_read_back(ours, list(got))
        assert all(len(e["xxh3_128_chunks"]) > 4 for e in got.values())
        weights = load_file(ours / "model.safetensors")
        assert "lm_head.weight" not in weights or "transformer.wte.weight" not in weights  # tied: stored once
        for k, v in weights.items():
            assert torch.equal(v, model.state_dict()[k]), k
        back = torch.load(ours / "optimizer.bin", weights_only=True)
        for i, s in opt.state_dict()["state"].items():
            for k, v in s.items():
                assert torch.equal(back["state"][i][k], v), (i, k)
    assert len(direct._pool) == direct.BUFFERS_PER_FILE  # the second file reused the first's buffers, all came back


@pytest.mark.parametrize("fs", ["disk", "ramfs"])
def test_direct_file_uses_o_direct_where_the_filesystem_allows_it(tmp_path: Path, fs: str,
                                                                  small_buffers: None) -> None:
    data = os.urandom(5 * direct.BUFFER_BYTES + 12345)
    with folder_on(fs, tmp_path) as folder:
        out = direct.DirectFile(folder / "f.bin")
        out.write(data[:100])  # unaligned pieces of every size, across buffer ends
        out.write(data[100:direct.BUFFER_BYTES + 7])
        out.write(data[direct.BUFFER_BYTES + 7:])
        entry = out.close()
        assert out.direct == (fs == "disk")
        assert (folder / "f.bin").read_bytes() == data
        assert entry == _entries_read_back(folder, ["f.bin"])["f.bin"]


def test_a_failed_write_reports_the_error_and_returns_the_buffers(tmp_path: Path, small_buffers: None) -> None:
    """torch.save fails in the middle (an object it cannot pickle, after 400 KB of tensor data went through the
    pipe): the error reaches the caller and the writer process is gone; a write that fails in a DirectFile's I/O
    thread (a closed descriptor) reaches its filler and the buffers go back to the pool."""
    bad = {"ok": torch.zeros(100_000), "bad": lambda: None}
    before = set(_children())
    with pytest.raises(Exception, match="(?i)pickle"):
        direct.save_torch(bad, tmp_path / "optimizer.bin")
    assert set(_children()) <= before  # the sink was killed and reaped
    out = direct.DirectFile(tmp_path / "f.bin")
    os.close(out.fd)
    out.fd = os.open(tmp_path / "f.bin", os.O_RDONLY)  # writes fail with EBADF in the I/O thread
    with pytest.raises(OSError):
        out.write(os.urandom(3 * direct.BUFFER_BYTES))
        out.close()
    out.abort()
    assert len(direct._pool) == direct.BUFFERS_PER_FILE


def _children() -> list[str]:
    return (Path("/proc") / str(os.getpid()) / "task" / str(os.getpid()) / "children").read_text().split()


def test_records_torch_writes_holding_the_gil_do_not_stall_the_save(tmp_path: Path) -> None:
    """The deadlock a pipe-reader thread had (CI, 2026-12-04): torch.save writes some records into the FIFO while
    holding the GIL (here a 3 MB data.pkl, more than the 1 MB pipe), so a reader thread that needs the GIL to
    continue stalls with it forever, and the training thread with them. The sink is another process: the save
    completes (in a child interpreter with a time limit, since a hang would hold this one's GIL too), with small
    buffers as in the tests above, and the file equals torch.save's."""
    script = f"""
import sys, torch
from pathlib import Path
from hf_gpt2_train.checkpoint import atomic, direct
direct.BUFFER_BYTES, atomic.CHUNK_BYTES = 64 << 10, 128 << 10
obj = {{"w": torch.randn(1 << 20), "names": [f"parameter_{{i}}" for i in range(200_000)]}}
entry = direct.save_torch(obj, Path({str(tmp_path / "optimizer.bin")!r}))
torch.save(obj, {str(tmp_path / "ref" / "optimizer.bin")!r})
assert len(entry["xxh3_128_chunks"]) > 4, entry
"""
    (tmp_path / "ref").mkdir()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "optimizer.bin").read_bytes() == (tmp_path / "ref" / "optimizer.bin").read_bytes()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(atomic, "CHUNK_BYTES", 128 << 10)
        got = _entries_read_back(tmp_path, ["optimizer.bin"])["optimizer.bin"]
    assert got["size"] == (tmp_path / "optimizer.bin").stat().st_size


def test_the_writer_process_is_not_a_rank_and_outlives_a_stop_signal(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A preemption's SIGTERM reaches every process of a Slurm job: the writer process of a save ignores it and
    finishes the file (the run's own stop saves `latest` through it). It carries no RANK/LOCAL_RANK, so tools that
    find a run's workers by them (the cluster tests do) do not count it."""
    import json
    import signal
    import time

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    fifo = str(tmp_path / "optimizer.bin")
    os.mkfifo(fifo)
    sink = direct.start_sink(fifo, tmp_path / "out.bin")
    try:
        fd = direct._open_writer(fifo, sink)
        data = os.urandom(3 << 20)
        os.set_blocking(fd, True)
        os.write(fd, data[:1 << 20])
        env = (Path("/proc") / str(sink.pid) / "environ").read_bytes().split(b"\0")
        assert not any(v.startswith((b"RANK=", b"LOCAL_RANK=")) for v in env)
        assert os.getpgid(sink.pid) != os.getpgid(0)  # its own session: group signals are the run's
        sink.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert sink.poll() is None  # still writing
        os.write(fd, data[1 << 20:])
        os.close(fd)
        out, err = sink.communicate(timeout=60)
    finally:
        if sink.poll() is None:
            sink.kill()
    assert sink.returncode == 0, err
    assert (tmp_path / "out.bin").read_bytes() == data
    assert json.loads(out)["size"] == len(data)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_checkpoint_on_a_filesystem_without_o_direct_verifies_and_resumes(tmp_path: Path, asynchronous: bool) -> None:
    """The manager's real path (host copy, writer thread, seal with the writers' entries) on ramfs: the saved
    files equal ``save_state``'s, the manifest verifies against the bytes on disk, and ``load_state`` resumes."""
    with ramfs(tmp_path / "out") as out:
        h = Harness(out, checkpoint_steps=2, async_checkpoint=asynchronous)
        h.steps(2)
        reference = tmp_path / "save_state"
        h.acc.save_state(str(reference))
        latest = out / "checkpoints" / "latest"
        v = atomic.verify(latest, hashes=True)
        assert v.ok, v.reason
        for name in ("model.safetensors", "optimizer.bin"):
            assert (latest / name).read_bytes() == (reference / name).read_bytes(), name
        resumed = Harness(out, checkpoint_steps=2)
        assert resumed.mgr.load(resumed.mgr.resolve_resume("latest"))["step"] == 2
        for a, b in zip(h.model.parameters(), resumed.model.parameters(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(h.opt.state_dict()["state"].values(), resumed.opt.state_dict()["state"].values(), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_writer_process_ends_when_the_training_process_is_killed(tmp_path: Path) -> None:
    """kill -9 of the training process while its writer process waits for torch.save to open the FIFO: the writer
    process ends too. It ignores stop signals and has its own session, so nothing else would end it (CI's kill -9
    tests left such processes waiting in `open` for good, one per kill that hit this moment)."""
    import signal
    import time

    script = f"""
import os, sys, time
from pathlib import Path
from hf_gpt2_train.checkpoint import direct
os.mkfifo({str(tmp_path / "optimizer.bin")!r})
sink = direct.start_sink({str(tmp_path / "optimizer.bin")!r}, Path({str(tmp_path / "out.bin")!r}))
print(sink.pid, flush=True)
time.sleep(600)
"""
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        sink = int(run.stdout.readline())
        time.sleep(1.5)  # the writer process has started and waits in open() for a writer of the FIFO
        state = (Path("/proc") / str(sink) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in "SR", state
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()

    def gone() -> bool:
        try:
            return (Path("/proc") / str(sink) / "stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        except FileNotFoundError:
            return True

    end = time.monotonic() + 10
    while not gone() and time.monotonic() < end:
        time.sleep(0.05)
    if not gone():
        os.kill(sink, signal.SIGKILL)
        raise AssertionError("the writer process outlived the killed training process")
