"""Checkpoint checksums: new saves record xxh3_128 (whole-file, or per chunk for large files); manifests written
before the switch (sha256) still verify; a single flipped byte is caught with either algorithm, in a whole file
and in any chunk; an old-format checkpoint resumes, and its damage makes resume fall back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import xxhash

from hf_gpt2_train.checkpoint import atomic

SMALL_CHUNKS = 1 << 20  # a multiple of mmap's allocation granularity, like the real 64 MiB


def _files(folder: Path) -> dict[str, bytes]:
    """A checkpoint-like folder: a file of 2.5 chunks, a small one, a nested one and an empty one."""
    rnd = os.urandom(SMALL_CHUNKS * 5 // 2)
    contents = {"optimizer.bin": rnd, "trainer_state.json": b'{"step": 3}', "sub/random_states_0.pkl": b"\x80rng",
                "empty.bin": b""}
    for rel, data in contents.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return contents


def write_sha256_manifest(folder: Path, chunk_bytes: int = atomic.CHUNK_BYTES) -> None:
    """Rewrite ``folder``'s manifest as the code before xxh3_128 wrote it (computed here with hashlib, not
    with the package's digest code): ``sha256``, or ``chunk_bytes`` + ``sha256_chunks`` for large files."""
    manifest = atomic.read_manifest(folder) if (folder / atomic.MANIFEST).exists() else {}
    entries = {}
    for p in atomic.data_files(folder):
        data = p.read_bytes()
        if len(data) <= chunk_bytes:
            entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            entry = {"size": len(data), "chunk_bytes": chunk_bytes, "sha256_chunks": [
                hashlib.sha256(data[i:i + chunk_bytes]).hexdigest() for i in range(0, len(data), chunk_bytes)]}
        entries[p.relative_to(folder).as_posix()] = entry
    (folder / atomic.MANIFEST).write_text(json.dumps({**manifest, "format": atomic.FORMAT, "files": entries}))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _sealed(folder: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    folder.mkdir()
    contents = _files(folder)
    monkeypatch.setattr(atomic, "CHUNK_BYTES", SMALL_CHUNKS)
    if algorithm == "xxh3_128":
        atomic.seal(folder, {"step": 3})  # what every new save does
    else:
        write_sha256_manifest(folder, SMALL_CHUNKS)
    return contents


def test_new_saves_record_xxh3_128_whole_and_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = _sealed(tmp_path / "ckpt", "xxh3_128", monkeypatch)
    files = atomic.read_manifest(tmp_path / "ckpt")["files"]
    assert set(files) == set(contents)
    big = contents["optimizer.bin"]
    assert files["optimizer.bin"] == {"size": len(big), "chunk_bytes": SMALL_CHUNKS, "xxh3_128_chunks": [
        xxhash.xxh3_128_hexdigest(big[i:i + SMALL_CHUNKS]) for i in range(0, len(big), SMALL_CHUNKS)]}
    for rel in ("trainer_state.json", "sub/random_states_0.pkl", "empty.bin"):
        assert files[rel] == {"size": len(contents[rel]), "xxh3_128": xxhash.xxh3_128_hexdigest(contents[rel])}
    assert "sha256" not in json.dumps(files)
    assert atomic.verify(tmp_path / "ckpt", hashes=True).ok


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("where", ["whole file", "first chunk", "middle chunk", "last partial chunk"])
def test_one_flipped_byte_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str,
                                    where: str) -> None:
    folder = tmp_path / "ckpt"
    _sealed(folder, algorithm, monkeypatch)
    assert atomic.verify(folder, hashes=True).ok  # sha256: an old-format manifest verifies as it is
    rel, offset, span = {"whole file": ("sub/random_states_0.pkl", 2, ""),
                         "first chunk": ("optimizer.bin", 0, "in bytes 0-1048575"),
                         "middle chunk": ("optimizer.bin", SMALL_CHUNKS + 12345, "in bytes 1048576-2097151"),
                         "last partial chunk": ("optimizer.bin", SMALL_CHUNKS * 5 // 2 - 1,
                                                "in bytes 2097152-3145727")}[where]
    _flip(folder / rel, offset)
    v = atomic.verify(folder, hashes=True)
    assert not v.ok and v.reason.startswith(f"{rel} does not match its checksum ({algorithm} "), v.reason
    assert span in v.reason and ("in bytes" in v.reason) == bool(span)
    assert atomic.verify(folder, hashes=False).ok  # same size: only the checksum can tell
    _flip(folder / rel, offset)
    assert atomic.verify(folder, hashes=True).ok


def test_an_entry_without_a_known_checksum_is_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    _sealed(folder, "xxh3_128", monkeypatch)
    manifest = atomic.read_manifest(folder)
    manifest["files"]["trainer_state.json"] = {"size": 11, "md5": "0" * 32}
    (folder / atomic.MANIFEST).write_text(json.dumps(manifest))
    v = atomic.verify(folder, hashes=True)
    assert not v.ok and "trainer_state.json has no checksum" in v.reason and "xxh3_128, sha256" in v.reason


def test_old_sha256_checkpoint_resumes_and_damage_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_checkpoint_manager import Harness

    h = Harness(tmp_path, checkpoint_steps=2, keep_last=1)
    h.steps(4)
    root = tmp_path / "checkpoints"
    tiers = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert {p.name for p in tiers} >= {"latest", "latest_backup"}
    for p in tiers:  # the checkpoints of a run saved before xxh3_128 (real 64 MiB chunking: small files whole)
        write_sha256_manifest(p)
        assert '"sha256"' in (p / atomic.MANIFEST).read_text() and "xxh3" not in (p / atomic.MANIFEST).read_text()
    r = Harness(tmp_path)
    assert r.mgr.load(r.mgr.resolve_resume("latest"))["path"] == str(root / "latest") and r.state.step == 4
    with open(root / "latest" / "model.safetensors", "r+b") as f:  # same size, different bytes
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    r = Harness(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_gpt2_train.checkpoint"):
        manifest = r.mgr.load(r.mgr.resolve_resume("latest"))
    assert manifest["path"] == str(root / "latest_backup") and r.state.step == 2
    assert "model.safetensors does not match its checksum (sha256 " in caplog.text and "falling back" in caplog.text
