"""Data a run can trust: damaged or changed shards of all three formats are named in one line before anything
reads them (exit 2, nothing written), `data verify` finds them, a prepare-data re-run repairs them, and a resume
refuses data other than the checkpoint's while a moved copy of the same data resumes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_gpt2_train.checkpoint import atomic
from hf_gpt2_train.cli import main as cli_main
from hf_gpt2_train.config import ConfigError, DataConfig
from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir
from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare
from hf_gpt2_train.data.shard_writer import shard_entry
from tests.conftest import free_port, run_cli, train_losses
from tests.test_data_formats import llmc_write_datafile

VAL_TOKENS, MAX_TOKENS, SHARD = 5_000, 25_000, 4_000  # 2 val + 5 train shards; quickstart needs 4160 val tokens
DAMAGES = ("truncated", "extended", "replaced", "missing")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory):
    """The checksum stamps (and the embedded corpus) of this module's runs go to a cache folder of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """tinyshakespeare speeches as JSON lines (one document each)."""
    docs = [p for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:1200]
    src = tmp_path_factory.mktemp("source") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return src


def prepare(src: Path, out: Path, **kw) -> Path:
    args = {"shard_size": SHARD, "val_tokens": VAL_TOKENS, "max_tokens": MAX_TOKENS, **kw}
    return run_prepare(PrepareArgs(source=str(src), output_dir=str(out), num_proc=1, progress=False, verbose=False,
                                   **args))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, source: Path) -> dict[str, Path]:
    """The same token stream in our format, build-nanogpt's numbered .npy and llm.c's numbered .bin."""
    root = tmp_path_factory.mktemp("pristine")
    ours = prepare(source, root / "ours")
    m = json.loads((ours / "manifest.json").read_text())
    parts = [np.load(ours / s["file"]) for s in m["shards"]]
    nano, llmc = root / "nanogpt", root / "llmc"
    nano.mkdir()
    llmc.mkdir()
    for i, (s, tokens) in enumerate(zip(m["shards"], parts, strict=True)):
        np.save(nano / f"edufineweb_{s['split']}_{i:06d}.npy", tokens)
        llmc_write_datafile(llmc / f"fineweb_{s['split']}_{i:06d}.bin", tokens)
    return {"ours": ours, "nanogpt": nano, "llmc": llmc}


def shard_files(d: Path) -> list[Path]:
    """The shards of ``d`` in stream order (the manifest's for ours, the shards' numbers otherwise)."""
    if (d / "manifest.json").exists():
        return [d / s["file"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
    return sorted((p for p in d.iterdir() if p.suffix in (".npy", ".bin")), key=lambda p: int(p.stem[-6:]))


def damage(d: Path, how: str, which: int, rng: np.random.Generator) -> tuple[Path, int, int]:
    """Damage shard number ``which`` of ``d`` as a bad copy does; returns (file, size before, size after)."""
    p = shard_files(d)[which]
    size = p.stat().st_size
    if how == "truncated":  # an interrupted copy: anywhere from an empty file to one byte short
        os.truncate(p, int(rng.integers(0, size)))
    elif how == "extended":  # a copy appended to an old file, or a tool that pads
        with open(p, "ab") as f:
            f.write(bytes(int(rng.integers(1, 5000))))
    elif how == "replaced" and (d / "manifest.json").exists():
        # The right size, other tokens: a preallocated copy interrupted (zeros), bit rot. Only checksums see it.
        data = bytearray(p.read_bytes())
        at = int(rng.integers(128, size - 64))
        data[at:at + 64] = bytes(64) if data[at:at + 64] != bytes(64) else b"\xff" * 64
        p.write_bytes(bytes(data))
    elif how == "replaced":  # without checksums: a file of the same name and size that is no shard (an error page)
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        p.unlink()
    return p, size, p.stat().st_size if p.exists() else 0


def one_line_error(d: Path) -> str:
    with pytest.raises(ConfigError) as e:
        resolve_data_dir(DataConfig(data_dir=str(d)))
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def tree_digest(d: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in skip}


# ---------------------------------------------------------------------- damage found before reading
@pytest.mark.parametrize("fmt", ["ours", "nanogpt", "llmc"])
def test_every_kind_of_damage_at_any_shard_is_one_line_naming_file_expected_found_and_fix(
        fmt: str, pristine: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(["ours", "nanogpt", "llmc"].index(fmt))
    n = len(shard_files(pristine[fmt]))
    fix = "re-run `hf-gpt2-train prepare-data --source" if fmt == "ours" else "copy "
    header = {"ours": 0, "nanogpt": 128, "llmc": 1024}[fmt]
    replaced = {"ours": "does not match its checksum", "nanogpt": "header cannot be read",
                "llmc": "not an llm.c GPT-2 token file"}[fmt]
    for how in DAMAGES:
        # Any shard (first val, a train shard, the last) for our format; a missing shard of a folder without
        # manifest shows only as a gap in the numbers (the last one missing is caught on resume, see below).
        positions = [0, int(rng.integers(1, n - 1)), n - 1] if fmt == "ours" or how != "missing" else [1, n - 2]
        for which in positions:
            d = tmp_path / f"{how}{which}"
            shutil.copytree(pristine[fmt], d)
            p, before, after = damage(d, how, which, rng)
            msg = one_line_error(d)
            assert msg.startswith((f"data shard {p} ", f"{p} ")) and fix in msg, msg
            if how == "missing":
                assert "is missing" in msg, msg
            elif how == "replaced":
                assert replaced in msg, msg
            else:
                assert f"{after:,} bytes" in msg, msg
                assert (f"{before:,}" in msg) == (after >= header or how == "extended"), msg  # the size it implies


def test_changed_bytes_are_found_by_checksum_once_per_copy(pristine: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The default reads every byte once per copy: an unchanged copy is not hashed again, a shard changed in place
    (same size) is, and so is every shard of a new copy; --verify_data_checksums false checks sizes only."""
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path / "cache"))
    hashed: list[list[str]] = []
    real = atomic.hash_mismatches

    def spy(folder: Path, manifest: dict, only: list[str] | None = None) -> dict[str, str]:
        hashed.append(sorted(manifest["files"]))
        return real(folder, manifest, only)

    monkeypatch.setattr(atomic, "hash_mismatches", spy)
    d = tmp_path / "data"
    shutil.copytree(pristine["ours"], d)
    time.sleep(2.1)  # files changed in the last 2 s are not remembered (timestamps are coarse)
    resolve_data_dir(DataConfig(data_dir=str(d)))
    resolve_data_dir(DataConfig(data_dir=str(d)))
    assert len(hashed) == 1 and len(hashed[0]) == 7  # the second start only compared file stamps
    p, _, _ = damage(d, "replaced", 3, np.random.default_rng(5))
    assert "does not match its checksum" in one_line_error(d)
    assert hashed[-1] == [p.name]  # only the changed shard was read again
    resolve_data_dir(DataConfig(data_dir=str(d), verify_data_checksums=False))  # sizes and headers only

    shutil.rmtree(d)
    shutil.copytree(pristine["ours"], d)  # a new copy at the same path: new files, all hashed
    resolve_data_dir(DataConfig(data_dir=str(d)))
    assert len(hashed[-1]) == 7


# -------------------------------------------------------------------------------------- data verify
def verify(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        cli_main(["data", "verify", *args])
    out = capsys.readouterr()
    return e.value.code, (out.out + out.err).strip().splitlines()


def test_data_verify_names_every_damaged_shard_and_exits_0_1_2(pristine: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    for fmt, d in pristine.items():
        code, lines = verify(capsys, str(d), "--checksums")
        assert code == 0 and len(lines) == 1 and lines[0].startswith(f"OK  {d}: 7 shards ({fmt})"), lines
        assert ("checksums (" in lines[0]) == (fmt == "ours"), lines  # only prepare-data records checksums
    d = tmp_path / "ours"
    shutil.copytree(pristine["ours"], d)
    rng = np.random.default_rng(1)
    truncated, _, _ = damage(d, "truncated", 1, rng)
    replaced, _, _ = damage(d, "replaced", 5, rng)
    code, lines = verify(capsys, str(d))
    assert code == 1 and lines[0].startswith(f"DAMAGED  data shard {truncated} is truncated: "), lines
    assert len(lines) == 2 and "1 of 7 shard(s)" in lines[1] and "re-run `hf-gpt2-train prepare-data" in lines[1]
    code, lines = verify(capsys, str(d), "--checksums")  # every byte: the replaced shard too
    assert code == 1 and len(lines) == 3 and str(replaced) in lines[1] and "checksum" in lines[1], lines
    code, lines = verify(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines


# ------------------------------------------------------------------------------------------- repair
def test_prepare_data_rerun_remakes_exactly_the_damaged_shards(source: Path, pristine: dict[str, Path],
                                                              tmp_path: Path) -> None:
    good = {p.name: p.read_bytes() for p in shard_files(pristine["ours"])}
    d = tmp_path / "ours"
    shutil.copytree(pristine["ours"], d)
    intact = {p.name: p.stat().st_ino for p in shard_files(d)[1::2]}
    rng = np.random.default_rng(2)
    for how, which in zip(DAMAGES, (0, 2, 4, 6), strict=True):
        damage(d, how, which, rng)
    prepare(source, d)
    assert {p.name: p.read_bytes() for p in shard_files(d)} == good
    assert {n: (d / n).stat().st_ino for n in intact} == intact  # the intact shards were kept, not rewritten
    resolve_data_dir(DataConfig(data_dir=str(d)))

    # A folder prepared before sizes, checksums and starts were recorded: replayed from the stream's start.
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        for k in ("size", "xxh3_128", "start"):
            s.pop(k)
    (d / "manifest.json").write_text(json.dumps(m))
    p, _, _ = damage(d, "truncated", 5, rng)
    assert f"data shard {p} " in one_line_error(d)  # old manifests: the .npy header still tells the size
    prepare(source, d)
    assert {p.name: p.read_bytes() for p in shard_files(d)} == good

    # A source that changed since (same size, so the settings match): refused, the damaged shard left as it was.
    changed = tmp_path / "changed.jsonl"
    text = source.read_text()
    changed.write_text(text.replace("the", "THE"))
    d2 = tmp_path / "d2"
    shutil.copytree(pristine["ours"], d2)
    m = json.loads((d2 / "manifest.json").read_text())
    m["settings"]["source"]["files"] = [[str(changed.resolve()), changed.stat().st_size]]
    (d2 / "manifest.json").write_text(json.dumps(m))
    p, _, _ = damage(d2, "truncated", 3, rng)
    damaged_bytes = p.read_bytes()
    with pytest.raises(ConfigError, match="source changed since it was prepared"):
        prepare(changed, d2)
    assert p.read_bytes() == damaged_bytes and not list(d2.glob("*.tmp"))


# ------------------------------------------------------------------------------------ resume identity
@pytest.mark.parametrize("fmt", ["ours", "nanogpt", "llmc"])
def test_loader_state_refuses_other_data_and_accepts_a_moved_copy(fmt: str, pristine: dict[str, Path],
                                                                  tmp_path: Path, source: Path) -> None:
    loader = TrainLoader(pristine[fmt], 64, 4, 0, 1, seed=0, shuffle=True)
    loader.next_batch()
    state = loader.state_dict()

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(pristine[fmt], moved)
    again = TrainLoader(moved, 64, 4, 0, 1, seed=0, shuffle=True)
    again.load_state_dict(state)
    assert again.position == loader.position and again.next_batch()[0].equal(loader.next_batch()[0])

    def refused(d: Path) -> str:
        with pytest.raises(ConfigError) as e:
            TrainLoader(d, 64, 4, 0, 1, seed=0, shuffle=True).load_state_dict(state)
        assert e.value.every_process and "not the data the checkpoint was trained on" in str(e.value)
        return str(e.value)

    old = {k: v for k, v in state.items() if k != "data"}  # saved before the data's identity was kept
    again.load_state_dict(old)
    with pytest.raises(ConfigError, match="training tokens"):
        TrainLoader(moved, 64, 4, 0, 1, seed=0, shuffle=True).load_state_dict({**old, "train_tokens": 1})

    last = tmp_path / "last_missing"  # the last shard lost: nothing at a fresh start misses it without a manifest
    shutil.copytree(pristine[fmt], last)
    lost = shard_files(last)[-1]
    lost.unlink()
    if fmt == "ours":
        m = json.loads((last / "manifest.json").read_text())
        m["shards"].pop()
        (last / "manifest.json").write_text(json.dumps(m))
    assert f"{lost.name} (4,000 train tokens) of the run's data is missing" in refused(last)

    other = tmp_path / "other"  # intact data, but not the run's: one shard with other tokens
    if fmt == "ours":
        prepare(source, other, max_tokens=MAX_TOKENS - 1000)
        assert "train_000004.npy holds 3,000 train tokens, the run's held 4,000" in refused(other)
        same_shape = tmp_path / "same_shape"  # the same names and token counts, other bytes (a re-made shard)
        shutil.copytree(pristine[fmt], same_shape)
        p, _, _ = damage(same_shape, "replaced", 3, np.random.default_rng(8))
        m = json.loads((same_shape / "manifest.json").read_text())
        m["shards"][3].update(shard_entry(p))
        (same_shape / "manifest.json").write_text(json.dumps(m))
        assert f"{p.name} holds other bytes (checksum" in refused(same_shape)
        assert "--resume_on_other_data true" in refused(same_shape)
        # Asked for: the same number of windows continues the position on the other bytes ...
        cont = TrainLoader(same_shape, 64, 4, 0, 1, seed=0, shuffle=True, other_data_ok=True)
        cont.load_state_dict(state)
        assert (cont.epoch, cont.cursor) == (state["epoch"], state["cursor"]) and \
            cont.window_indices(0, 4).tolist() == loader.window_indices(0, 4).tolist()
        # ... but other data of another length cannot hold it: refused, naming the window counts.
        with pytest.raises(ConfigError, match="the position cannot continue"):
            TrainLoader(other, 64, 4, 0, 1, seed=0, shuffle=True, other_data_ok=True).load_state_dict(state)
    else:
        shutil.copytree(pristine[fmt], other)
        p = shard_files(other)[3]
        tokens = np.load(p) if fmt == "nanogpt" else np.fromfile(p, dtype=np.uint16, offset=1024)
        p.unlink()
        if fmt == "nanogpt":
            np.save(p, tokens[:-100])
        else:
            llmc_write_datafile(p, tokens[:-100])
        assert f"{p.name} holds 3,900 train tokens, the run's held 4,000" in refused(other)


def test_a_damaged_embedded_corpus_is_prepared_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded corpus is a cache: damage to it is repaired by preparing it again, not reported."""
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path / "cache"))
    d = resolve_data_dir(DataConfig())
    good = {p.name: p.read_bytes() for p in shard_files(d)}
    for how, which in (("truncated", 0), ("replaced", 1)):  # its val shard cut short, its train shard's bytes
        damage(d, how, which, np.random.default_rng(which))
        assert resolve_data_dir(DataConfig()) == d
        assert {p.name: p.read_bytes() for p in shard_files(d)} == good
        assert [p.name for p in d.parent.iterdir()] == [d.name]  # the damaged copy was removed


# ------------------------------------------------------------------------------- the real command
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, pristine: dict[str, Path]) -> Path:
    """2 steps of the quickstart preset on our format with every default (trackers, eval, checksums)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train", "--preset", "quickstart", "--data_dir", str(pristine["ours"]), "--output_dir", str(out),
            "--max_steps", "2", check=True)
    return out


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    err = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("hf-gpt2-train: error: "), proc.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_fresh_run_on_a_truncated_shard_stops_before_writing_anything(pristine: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    d = tmp_path / "data"
    shutil.copytree(pristine["ours"], d)
    p, _, _ = damage(d, "truncated", 3, np.random.default_rng(3))
    proc = run_cli("train", "--preset", "quickstart", "--data_dir", str(d), "--output_dir", str(tmp_path / "o"))
    assert_one_error_line(proc, f"data shard {p} is truncated", "re-run `hf-gpt2-train prepare-data")
    assert not (tmp_path / "o").exists()


def test_resume_refuses_changed_data_untouched_and_resumes_a_repaired_moved_copy(
        trained: Path, pristine: dict[str, Path], source: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = tree_digest(out, skip=("train.log",))  # the checkpoints, run_info.json, metrics, TensorBoard
    resume = ["train", "--preset", "quickstart", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]

    other = prepare(source, tmp_path / "other", max_tokens=MAX_TOKENS + 3000)  # intact, but not the run's data
    assert_one_error_line(run_cli(*resume, "--data_dir", str(other)), "is not the data the checkpoint was trained on",
                          "train_000005.npy (3,000 train tokens) was not part of the run's data", "another folder is fine")
    assert tree_digest(out, skip=("train.log",)) == before

    moved = tmp_path / "copied" / "data"  # the run's data copied to another path; one shard with other bytes
    shutil.copytree(pristine["ours"], moved)
    p, _, _ = damage(moved, "replaced", 4, np.random.default_rng(4))  # the right size: found by its checksum
    line = assert_one_error_line(run_cli(*resume, "--data_dir", str(moved)), f"data shard {p} does not match")
    assert tree_digest(out, skip=("train.log",)) == before
    command = line.split("re-run `", 1)[1].split("`", 1)[0]  # the fix the line names, run as printed
    assert command.startswith("hf-gpt2-train prepare-data ") and f"--output_dir {moved}" in command
    run_cli(*shlex.split(command)[1:], check=True)
    run_cli(*resume, "--data_dir", str(moved), "--max_steps", "3", check=True)
    assert max(train_losses(out)) == 3


@pytest.mark.slow
def test_damaged_data_under_torchrun_is_printed_once(pristine: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "nanogpt"
    shutil.copytree(pristine["nanogpt"], d)
    (d / "edufineweb_train_000003.npy").unlink()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "hf_gpt2_train", "train", "--preset", "quickstart", "--data_dir",
                           str(d), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    ours = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("hf-gpt2-train: error:")]
    assert len(ours) == 1 and "edufineweb_train_000003.npy is missing" in ours[0], proc.stderr[-3000:]
    assert "hf_gpt2_train/" not in proc.stderr and not (tmp_path / "o").exists()
