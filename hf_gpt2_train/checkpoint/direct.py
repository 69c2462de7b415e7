"""The model and optimizer files of a checkpoint written with direct I/O, checksummed on the way out.

Why (measured on this project's VM, docs/benchmarks.md "Where a save's time goes"): writing the 1.5 GB of a gpt2
checkpoint through the page cache cost 4.3 s of CPU time, because every page-cache page the kernel fills is fresh
guest memory (first-touch faults); the same bytes written with ``O_DIRECT`` from reused, page-aligned buffers cost
0.04 s of CPU and 0.5 s of wall time including the fsync. That CPU time is what a background save takes away from
training on a machine whose cores the training step uses, so it is removed rather than moved to another thread.

The files are byte for byte what ``accelerator.save_state`` writes (a test compares them):

* ``save_safetensors``: what ``accelerate.utils.save(state, path, safe_serialization=True)`` writes. Accelerate's own
  ``clean_state_dict_for_safetensors`` drops tied weights; the header is safetensors' (tensor order and dtype codes
  from ``safetensors.serialize`` itself, sizes and offsets filled in, padded to 8 bytes as safetensors pads it);
  the tensor bytes follow in that order, copied from the tensors into the aligned buffers.
* ``save_torch``: what ``torch.save(obj, path)`` writes, written by ``torch.save`` itself into a FIFO that has the
  file's name (torch names the zip's top folder after the file) and read from it into the aligned buffers.

Each returns the file's manifest entry (size and xxh3_128, whole or per ``atomic.CHUNK_BYTES`` chunk, as
``atomic.seal`` would record it), computed from the bytes while they are in the buffers, so sealing does not read
the file back. A filesystem without ``O_DIRECT`` (tmpfs, some network filesystems) gets ordinary buffered writes;
every file is fsync'd before its entry is returned.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import xxhash

from hf_gpt2_train.checkpoint import atomic

ALIGN = 4096  # O_DIRECT needs buffer addresses, file offsets and lengths aligned to the logical block size
BUFFER_BYTES = 16 << 20  # divides atomic.CHUNK_BYTES, so chunk checksums end at buffer boundaries
BUFFERS_PER_FILE = 3  # one being filled, one being written, one spare
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031

_pool: list[mmap.mmap] = []  # page-aligned buffers, allocated once per process and reused by every save
_pool_lock = threading.Lock()


def _take_buffers(n: int) -> list[mmap.mmap]:
    with _pool_lock:
        taken = [_pool.pop() for _ in range(min(n, len(_pool)))]
    return taken + [mmap.mmap(-1, BUFFER_BYTES) for _ in range(n - len(taken))]


def _return_buffers(bufs: list[mmap.mmap]) -> None:
    with _pool_lock:
        _pool.extend(bufs)


def _address(buf: mmap.mmap) -> int:
    """Address of an mmap buffer (it is writable, so ctypes can view it without a copy)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class DirectFile:
    """A new file written sequentially from aligned buffers: ``O_DIRECT`` when the filesystem allows it.

    A second thread hashes each full buffer and writes it while the caller fills the next; ``close`` writes the
    rest, fsyncs, and returns the manifest entry. ``ctypes.memmove``, ``os.write`` and xxhash release the GIL.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0), 0o666)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self.direct = False  # tmpfs and some network filesystems refuse O_DIRECT
            self.fd = os.open(self.path, flags, 0o666)
        self.size = 0
        self._bufs = _take_buffers(BUFFERS_PER_FILE)
        self._addr = {id(b): _address(b) for b in self._bufs}
        self._free: queue.Queue = queue.Queue()
        for b in self._bufs[1:]:
            self._free.put(b)
        self._full: queue.Queue = queue.Queue()
        self._cur, self._pos = self._bufs[0], 0
        self._hash, self._chunk_left, self._digests = xxhash.xxh3_128(), atomic.CHUNK_BYTES, []
        self._error: BaseException | None = None
        self._closed = False
        self._io = threading.Thread(target=self._drain, name="checkpoint-direct-io", daemon=True)
        self._io.start()

    # ---------------------------------------------------------------------------------------- filling
    def write(self, data: Any) -> int:
        """Append a bytes-like object (file-like ``write``)."""
        mv = memoryview(data).cast("B")
        if len(mv) == 0:
            return 0
        import numpy as np  # a read-only buffer's address without copying it

        self.write_from(np.frombuffer(mv, dtype=np.uint8).ctypes.data, len(mv))
        return len(mv)

    def write_from(self, address: int, n: int) -> None:
        """Append ``n`` bytes read from memory at ``address``."""
        done = 0
        while done < n:
            take = min(n - done, BUFFER_BYTES - self._pos)
            ctypes.memmove(self._addr[id(self._cur)] + self._pos, address + done, take)
            self._pos += take
            done += take
            if self._pos == BUFFER_BYTES:
                self._submit()

    def fill_from(self, fd: int) -> None:
        """Append everything read from ``fd`` (a pipe) until end of file. On an error the pipe is closed, so its
        writer fails instead of blocking on a full pipe."""
        try:
            while True:
                view = memoryview(self._cur)[self._pos:BUFFER_BYTES]
                try:
                    n = os.readv(fd, [view])
                finally:
                    view.release()
                if n == 0:
                    return
                self._pos += n
                if self._pos == BUFFER_BYTES:
                    self._submit()
        except BaseException:
            os.close(fd)
            raise

    def _submit(self) -> None:
        self._full.put((self._cur, self._pos))
        self._cur, self._pos = self._free.get(), 0
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------------------------- I/O thread
    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self._hash_bytes(buf, n)
                    self._write_out(buf, n)
            except BaseException as e:  # reported to the filler at its next buffer, and by close()
                self._error = e
            finally:
                self._free.put(buf)

    def _hash_bytes(self, buf: mmap.mmap, n: int) -> None:
        view, start = memoryview(buf), 0
        try:
            while start < n:
                take = min(n - start, self._chunk_left)
                self._hash.update(view[start:start + take])
                start += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._digests.append(self._hash.hexdigest())
                    self._hash, self._chunk_left = xxhash.xxh3_128(), atomic.CHUNK_BYTES
        finally:
            view.release()

    def _write_out(self, buf: mmap.mmap, n: int) -> None:
        length = -(-n // ALIGN) * ALIGN if self.direct else n  # the padding is cut off by close()'s ftruncate
        view, done = memoryview(buf), 0
        try:
            while done < length:
                done += os.write(self.fd, view[done:length])
        finally:
            view.release()
        self.size += n

    # ------------------------------------------------------------------------------------------- end
    def close(self) -> dict[str, Any]:
        """Write what is left, fsync, close; the manifest entry of the file (as ``atomic.seal`` records it)."""
        try:
            self._full.put((self._cur, self._pos))
            self._full.put(None)
            self._io.join()
            if self._error is not None:
                raise self._error
            if self.direct and self.size % ALIGN:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
            if self._chunk_left < atomic.CHUNK_BYTES or not self._digests:
                self._digests.append(self._hash.hexdigest())
            return atomic.file_entry(self.size, self._digests)
        finally:
            self._finish()

    def abort(self) -> None:
        """Stop after an error elsewhere (the half-written file is removed with its folder)."""
        if not self._closed:
            self._full.put(None)
            self._io.join()
            self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            _return_buffers(self._bufs)


# ---------------------------------------------------------------------------------------------- formats
def safetensors_header(tensors: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    """The header ``safetensors.torch.save_file(tensors, metadata=metadata)`` writes: 8-byte length + JSON.

    The order of the tensors and their dtype codes come from ``safetensors.serialize`` itself (called with
    empty tensors: it orders by dtype, then name); shapes and offsets are filled in and the JSON padded with
    spaces to a multiple of 8 bytes, as safetensors does."""
    from safetensors import serialize
    from safetensors.torch import TensorSpec

    def dtype_name(t: Any) -> str:
        return str(t.dtype).split(".")[-1]

    empty = serialize({k: TensorSpec(dtype=dtype_name(t), shape=[0], data_ptr=0, data_len=0)
                       for k, t in tensors.items()}, metadata=metadata)
    n = int.from_bytes(empty[:8], "little")
    header = json.loads(empty[8:8 + n], object_pairs_hook=OrderedDict)
    offset = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        t = tensors[name]
        spec = TensorSpec(dtype=dtype_name(t), shape=list(t.shape), data_ptr=0, data_len=0)
        size = t.numel() * t.element_size()
        info["shape"], info["data_offsets"] = list(spec.shape), [offset, offset + size]
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def save_safetensors(state: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """``accelerate.utils.save(state, path, safe_serialization=True)``'s bytes; returns the manifest entry."""
    import torch
    from accelerate.utils.other import clean_state_dict_for_safetensors

    if isinstance(state, OrderedDict):  # as accelerate.utils.save does (it drops tied weights, makes contiguous)
        state = clean_state_dict_for_safetensors(state)
    tensors = {k: (v if v.device.type == "cpu" else v.to("cpu")).contiguous() for k, v in state.items()}
    header = safetensors_header(tensors, {"format": "pt"} if metadata is None else metadata)
    order = [k for k in json.loads(header[8:]) if k != "__metadata__"]
    out = DirectFile(path)
    try:
        out.write(header)
        with torch.no_grad():
            for k in order:
                t = tensors[k]
                out.write_from(t.data_ptr(), t.numel() * t.element_size())
    except BaseException:
        out.abort()
        raise
    return out.close()


def save_torch(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save(obj, path)``'s bytes, written with direct I/O; returns the manifest entry.

    ``torch.save`` writes into a FIFO named like the file (torch names the zip's top folder after it) and a child
    process (``_sink``) reads the FIFO into the aligned buffers, checksums and writes them. Not a thread: torch
    holds the GIL while it writes some records into the pipe, so a reader thread that needs the GIL to go on
    reading deadlocks with it once the pipe is full (seen under load), and the training thread waits too."""
    import torch

    with tempfile.TemporaryDirectory(prefix="hf-gpt2-train-save-") as d:
        fifo = os.path.join(d, path.name)
        os.mkfifo(fifo, 0o600)
        sink = start_sink(fifo, path)
        try:
            keep = _open_writer(fifo, sink)  # the sink reads: torch's own open cannot block
            try:
                torch.save(obj, fifo)
            finally:
                os.close(keep)  # end of file for the sink once torch.save closed its end too
            out, err = sink.communicate()
        except BaseException:
            sink.kill()
            sink.wait()
            raise
    if sink.returncode != 0:
        raise OSError(f"writing {path} failed: {err.decode(errors='replace').strip().splitlines()[-1:]}")
    return json.loads(out)


def start_sink(fifo: str, path: Path) -> subprocess.Popen:
    """The process that reads ``fifo`` into ``path`` (``_sink``); its stdout is the manifest entry."""
    root = str(Path(__file__).resolve().parents[2])  # this checkout's package, whatever the launcher's path
    # Not a rank: without the launcher's variables (tools that find a run's workers by them must not count it).
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", "from hf_gpt2_train.checkpoint.direct import _sink; _sink()",
                             fifo, str(path), str(BUFFER_BYTES), str(atomic.CHUNK_BYTES), str(PIPE_BYTES),
                             str(os.getpid())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # a Ctrl-C or a signal to the run's process group is the run's


def _open_writer(fifo: str, sink: subprocess.Popen) -> int:
    """A write end of ``fifo`` once the sink has opened its read end (an error if the sink died first)."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if sink.poll() is not None:
            raise OSError(f"the checkpoint writer process exited ({sink.returncode}): "
                          f"{sink.stderr.read().decode(errors='replace').strip()[-500:] if sink.stderr else ''}")
        time.sleep(0.002)


_LAUNCHER_VARS = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                            "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"})


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux ``PR_SET_PDEATHSIG``; the
    thread waits for this process, so it only ends first when the training process dies); exit now if it died
    before that took effect. Elsewhere a no-op."""
    import signal

    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _sink() -> None:
    """Child process of ``save_torch``: FIFO -> aligned buffers -> checksums and (direct) writes; prints the entry.

    Stop signals are ignored: a preemption's SIGTERM reaches every process of a Slurm job, and the save it makes
    the run write (``latest``) goes through this process; it ends at the end of its input (the parent closed the
    FIFO) and is killed when the training process dies (a kill -9 before torch.save opened the FIFO would
    otherwise leave it waiting in ``open`` for good, in its own session where nothing else ends it)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    global BUFFER_BYTES, PIPE_BYTES
    fifo, path, buffer_bytes, chunk_bytes, pipe_bytes, parent = sys.argv[1:7]
    _die_with(int(parent))
    BUFFER_BYTES, PIPE_BYTES, atomic.CHUNK_BYTES = int(buffer_bytes), int(pipe_bytes), int(chunk_bytes)
    fd = os.open(fifo, os.O_RDONLY)
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # a smaller pipe is only slower
    out = DirectFile(Path(path))
    try:
        out.fill_from(fd)
    except BaseException:
        out.abort()
        raise
    sys.stdout.write(json.dumps(out.close()))
