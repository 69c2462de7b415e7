"""Checkpoints as a user meets them: the real CLI in subprocesses, real signals, real kill -9, real disks.

Every run uses one small configuration (a 1-layer quickstart GPT-2, 256 tokens per step, fp32 on CPU) so
that per-step losses of different runs are comparable bit for bit: a run that was interrupted and resumed
must log exactly the losses of the uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from hf_gpt2_train.checkpoint import atomic
from tests.conftest import REPO, run_cli

TOKENS_PER_STEP = 256  # 2 sequences of 64 x 2 micro-batches (1 process) or x 2 processes
SMALL = {"preset": "quickstart", "n_layer": 1, "n_embd": 32, "n_head": 2, "total_batch_size": TOKENS_PER_STEP,
         "per_device_train_batch_size": 2, "seq_len": 64, "report_to": "none", "hellaswag": "false",
         "val_batches": 1, "sample_max_new_tokens": 0, "logging_steps": 1, "eval_steps": 4, "max_steps": 8,
         "checkpoint_steps": 2, "keep_last": 2, "milestone_steps": 4}


def train_args(out: Path, **over: object) -> list[str]:
    args = ["train", "--output_dir", str(out)]
    for k, v in {**SMALL, **over}.items():
        args += [f"--{k}", str(v)]
    return args


def losses(out: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (the last line of a step wins)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen([sys.executable, "-m", "hf_gpt2_train", *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen | None, timeout: float = 120, poll: float = 0.05,
             what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def logged_steps(out: Path) -> int:
    try:
        return len([x for x in (out / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x])
    except FileNotFoundError:
        return 0


def visible_checkpoints_valid(root: Path) -> list[str]:
    """Every checkpoint folder a user can see verifies (sizes and checksums); returns their names."""
    names = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith(".") or not p.is_dir():
            continue
        v = atomic.verify(p, hashes=True)
        assert v.ok, f"{p.name}: {v.reason}"
        names.append(p.name)
    return names


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 8-step run every other run is compared with."""
    out = tmp_path_factory.mktemp("ckpt") / "reference"
    run_cli(*train_args(out), check=True)
    return out


def test_retention_and_tiers_of_a_full_run(reference: Path) -> None:
    root = reference / "checkpoints"
    assert visible_checkpoints_valid(root) == sorted(["best", "final", "latest", "latest_backup", "milestone_0000004",
                                                      "milestone_0000008", "step_0000006", "step_0000008"])
    assert {n: manifest(root / n)["step"] for n in ("latest", "latest_backup", "final")} == \
        {"latest": 8, "latest_backup": 6, "final": 8}
    evals = {json.loads(x)["step"]: json.loads(x)["eval/val_loss"] for x in
             (reference / "metrics.jsonl").read_text().splitlines() if "eval/val_loss" in x}
    assert sorted(evals) == [4, 8]
    assert manifest(root / "best")["step"] == min(evals, key=evals.get)
    m = manifest(root / "latest")
    assert m["config"]["model"]["n_embd"] == 32 and m["effective_precision"] == "fp32" and m["world_size"] == 1
    assert m["tokens_seen"] == 8 * TOKENS_PER_STEP and set(m["files"]) >= {"model.safetensors", "optimizer.bin",
                                                                "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"}
    assert (root / "latest" / "optimizer.bin").stat().st_ino == (root / "final" / "optimizer.bin").stat().st_ino


def test_saves_are_synchronous_on_cpu_by_default_with_the_reason_in_log_and_run_info(reference: Path) -> None:
    """The default follows the measurement (docs/benchmarks.md, Checkpoint I/O): training on CPU keeps every core
    busy, so a background write does not pay there; the choice and why are in train.log and run_info.json."""
    info = json.loads((reference / "run_info.json").read_text())
    assert info["async_checkpoint"]["enabled"] is False, info["async_checkpoint"]
    assert info["async_checkpoint"]["reason"].startswith("synchronous: training on CPU keeps every core busy")
    assert info["config"]["checkpoint"]["async_checkpoint"] is None  # 'auto': a resume on a GPU chooses again
    log = (reference / "train.log").read_text()
    assert f"checkpoint saves: {info['async_checkpoint']['reason']}" in log and "--async_checkpoint true to" in log
    saves = [line for line in log.splitlines() if "saved checkpoint" in line]
    assert len(saves) >= 4 and not [x for x in saves if "in the background" in x]  # every save written by the loop


def test_resume_from_step_n_is_bitwise_identical(reference: Path, tmp_path: Path) -> None:
    """8 steps straight vs the same run's step-4 checkpoint resumed for 4 more (through
    scripts/resume_training.sh, which rebuilds the config from run_info.json): identical losses."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    proc = subprocess.run([str(REPO / "scripts" / "resume_training.sh"), str(out), "milestone_0000004"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'milestone_0000004'} (step 4" in proc.stdout + proc.stderr
    assert losses(out) == losses(reference)  # steps 1-4 kept, 5-8 trained again after the resume
    assert "resumed from" in (out / "train.log").read_text() and manifest(out / "checkpoints" / "final")["step"] == 8


def test_second_sigint_exits_at_once_without_writing(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(train_args(out, checkpoint_steps=1), log)
    wait_for(lambda: logged_steps(out) >= 1, proc, what="the first step")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT received" in log.read_text(), proc, poll=0.001, what="the first SIGINT")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    after_first = text.split("SIGINT received")[1]
    assert "second SIGINT: exiting now without saving" in after_first
    # A save already under way when the first SIGINT came (step 1's: the test signals as soon as step 1 is
    # logged) may finish before the second one arrives, and logs its line then; after the second, nothing.
    after_second = after_first.split("second SIGINT: exiting now without saving")[1]
    assert "saved checkpoint" not in after_second and "Resume with" not in after_first
    assert all(manifest(out / "checkpoints" / n)["step"] <= max(losses(out))
               for n in visible_checkpoints_valid(out / "checkpoints"))


def test_sigterm_during_a_background_write_then_kill_9_rounds_then_the_printed_command_finishes_exactly(
        reference: Path, tmp_path: Path) -> None:
    """SIGTERM while a background (asynchronous, a GPU run's default) checkpoint write is in flight: the step finishes,
    the write completes, latest is saved, exit 0, the resume command is printed. Then kill -9 round after round
    with async saves every 2 steps, half of the kills while a background write is in flight: every restart
    resumes from the newest complete checkpoint, at most two save intervals back. Finally the printed command
    finishes the run, whose per-step losses equal the uninterrupted run's bit for bit."""
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rng = random.Random(os.getpid())
    # Asynchronous saves (a GPU run's default; on CPU the default is synchronous): the kills must hit background writes.
    args = train_args(out, resume_from_checkpoint="auto", async_checkpoint="true")  # checkpoint_steps=2
    last_logged = 0

    def newest_complete() -> int | None:
        steps = [manifest(root / n)["step"] for n in visible_checkpoints_valid(root)]
        return max(steps) if steps else None

    def incarnation(i: int, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        """Start a run, wait for its first new step, check where it resumed from."""
        log = tmp_path / f"incarnation{i}.log"
        newest = newest_complete()
        proc = start(argv, log)
        wait_for(lambda: "| loss" in log.read_text() or proc.poll() is not None, None, what="a new step")
        text = log.read_text()
        if newest is not None:
            resumed = int(re.search(r"resumed from \S+ \(step (\d+)", text).group(1))
            assert resumed >= newest, (resumed, newest)  # the newest complete checkpoint (or a recovered newer one)
            assert resumed >= last_logged - 4, (resumed, last_logged)  # at most two intervals lost
        else:
            assert "resumed from" not in text
        return proc, log

    # Saving every step, the next save at a step boundary nearly always finds the previous write in flight.
    proc, log = incarnation(0, train_args(out, resume_from_checkpoint="auto", checkpoint_steps=1,
                                          async_checkpoint="true"))
    wait_for(lambda: (root / ".tmp-save").exists() or proc.poll() is not None, None, poll=0.001, what="a write")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM received" in text
    assert "checkpoint saves: asynchronous (--async_checkpoint true)" in text and "in the background" in text
    last_logged = max(losses(out))
    assert last_logged < 8 and manifest(root / "latest")["step"] == last_logged
    assert not (root / ".tmp-save").exists() and visible_checkpoints_valid(root)  # sizes and checksums
    command = text.split("Resume with:")[1].strip().splitlines()[0]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "hf_gpt2_train"] and argv[-2:] == ["--resume_from_checkpoint", "latest"]

    kills, during_write = 0, 0
    for i in range(1, 7):
        proc, log = incarnation(i, args)
        if proc.poll() is not None:  # a fast machine finished the run before it could be killed
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
        if i % 2:  # while a background write is in flight: wait for this incarnation's first save, then kill
            wait_for(lambda: (root / ".tmp-save").exists() or proc.poll() is not None,  # noqa: B023
                     None, poll=0.001, what="a save")
            time.sleep(rng.uniform(0, 0.02))
            during_write += proc.poll() is None and (root / ".tmp-save").exists()
        else:
            time.sleep(rng.uniform(0, 0.6))
        proc.kill()
        kills += proc.wait() == -signal.SIGKILL
        last_logged = max(losses(out))
        visible_checkpoints_valid(root)
    assert kills >= 4 and during_write >= 2, (kills, during_write)

    final = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert losses(out) == losses(reference)
    assert manifest(root / "final")["step"] == 8 and visible_checkpoints_valid(root)
    # No writer process of a killed incarnation is left behind (they ignore stop signals, in their own session).
    time.sleep(0.5)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(root) in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """The real `hf-gpt2-train` entry point, in this process (saves ~10 s of imports per call)."""
    from hf_gpt2_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def test_checkpoints_list_and_verify_commands(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = subprocess.run([str(REPO / "scripts" / "list_checkpoints.sh"), str(reference)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert script.returncode == 0, script.stderr[-3000:]
    listed = script.stdout
    rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:] if line.strip() and
            not line.startswith(("8 checkpoint", "in progress"))}
    assert set(rows) == {"latest", "latest_backup", "best", "final", "milestone_0000004", "milestone_0000008",
                         "step_0000006", "step_0000008"}
    assert rows["latest"][1] == "8" and rows["latest"][2] == f"{8 * TOKENS_PER_STEP:,}" and rows["latest"][-1] == "yes"
    assert "on disk (tiers of one save share files through hard links)" in listed
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    with open(copy / "checkpoints" / "step_0000006" / "optimizer.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)  # same size, different bytes: only the checksum can tell
    (copy / "checkpoints" / "latest_backup" / "random_states_0.pkl").unlink()
    code, listed, _ = cli(capsys, "checkpoints", "list", str(copy))
    assert re.search(r"latest_backup .* NO: random_states_0.pkl is missing", listed), listed
    assert re.search(r"step_0000006 .* yes$", listed, re.M) and "add --checksums for a full check" in listed
    for flag in ("--checksums", "--sha256"):  # --sha256: the old spelling, kept working
        code, listed, _ = cli(capsys, "checkpoints", "list", str(copy), flag)
        assert re.search(r"step_0000006 .* NO: optimizer.bin does not match its checksum", listed), listed
        assert "validity checked by sizes and checksums" in listed
    code, out, _ = cli(capsys, "checkpoints", "verify", str(copy))
    assert code == 1
    assert re.search(r"INVALID\s+\S+step_0000006: optimizer.bin does not match its checksum \(xxh3_128 ", out), out
    assert re.search(r"INVALID\s+\S+latest_backup: random_states_0.pkl is missing", out), out
    assert re.search(r"OK\s+\S+/best  \(step \d, 5 files, sizes and checksums match\)", out), out
    assert out.count("OK ") == 6 and "2 of 8 checkpoint(s) invalid" in out
    code, out, _ = cli(capsys, "checkpoints", "verify", str(copy / "checkpoints" / "final"))
    assert code == 0 and out.startswith("OK")
    for flag in ("--no_checksums", "--no_sha256"):  # sizes only: the flipped bytes pass; --no_sha256: old spelling
        code, out, _ = cli(capsys, "checkpoints", "verify", flag, str(copy / "checkpoints" / "step_0000006"))
        assert code == 0 and "sizes match" in out, out
    code, out, err = cli(capsys, "checkpoints", "verify", str(tmp_path / "nope"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "does not exist" in err


def test_resume_of_another_model_shape_exits_2_and_writes_nothing(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    other = run_cli(*train_args(out, n_embd=64, resume_from_checkpoint=reference / "checkpoints" / "latest"))
    assert other.returncode == 2 and "n_embd=32 (this run: 64)" in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def _worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    ranks: dict[int, int] = {}
    for pid in map(int, subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True,
                                       text=True).stdout.split()):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = pid
    return ranks


@pytest.mark.slow
def test_preempted_two_process_run_resumes_on_one_process(reference: Path, tmp_path: Path) -> None:
    """SIGUSR1 reaches only rank 1 of a 2-process run: both ranks stop after the same step, save and exit 0.
    One process then resumes with the same global batch and continues the same token stream."""
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    out, log = tmp_path / "run", tmp_path / "ddp.log"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    f = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "-m", "hf_gpt2_train", *train_args(out)],
                            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    wait_for(lambda: logged_steps(out) >= 1, proc, timeout=180, what="the first 2-process step")
    os.kill(_worker_pids(proc)[1], signal.SIGUSR1)
    assert proc.wait(timeout=180) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "[rank 1] SIGUSR1 received" in text and "Resume with:" in text
    stopped = max(losses(out))
    latest = out / "checkpoints" / "latest"
    assert stopped < 8 and manifest(latest)["step"] == stopped and manifest(latest)["world_size"] == 2
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest(latest)["files"])
    # Same global batch and data in both layouts: 2 ranks x 1 micro-batch average their gradients as
    # (g0 + g1) / 2, 1 rank x 2 micro-batches accumulates g0 / 2 + g1 / 2. That is the same math, but DDP
    # reduces flattened buckets, so the last bits may differ (bitwise equality is promised, and tested, for
    # the same world size): compare to float32 rounding.
    def close(a: dict[int, float], b: dict[int, float]) -> bool:
        return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) for k in a)

    assert close(losses(out), {s: losses(reference)[s] for s in range(1, stopped + 1)})
    run_cli(*train_args(out, resume_from_checkpoint="latest"), check=True)
    assert close(losses(out), losses(reference))
    # The token stream continued exactly: the loader position at the end equals the uninterrupted run's.
    pos = [torch.load(d / "checkpoints" / "final" / "custom_checkpoint_1.pkl", weights_only=False)
           for d in (out, reference)]
    assert pos[0] == pos[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="a real full disk needs a tmpfs mount (root); test_checkpoint_disk covers EFBIG without")
def test_disk_full_stops_training_with_a_clear_error_and_keeps_checkpoints(reference: Path, tmp_path: Path) -> None:
    from tests.test_checkpoint_disk import fill, tmpfs

    out, root, log = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run.log"
    with tmpfs(root, "256m"):
        proc = start(train_args(out, resume_from_checkpoint="auto"), log)  # auto: the mount point is empty
        # The save is complete when it says so: its other tiers are linked after latest's manifest appears.
        wait_for(lambda: re.search(r"saved checkpoint \S+ at step 4 ", log.read_text()) is not None,
                 proc, poll=0.002, what="the step-4 checkpoint")
        # Freeze the run while the disk fills, so that the step-6 save cannot finish first (it may have begun:
        # then it fails half-written, which is the case a full disk usually makes).
        proc.send_signal(signal.SIGSTOP)
        assert manifest(root / "latest")["step"] == 4
        filler = fill(root)  # the disk is now full: the step-6 save cannot complete
        proc.send_signal(signal.SIGCONT)
        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert rc != 0 and "could not save the checkpoint of step 6" in text and "No space left on device" in text
        assert "Earlier checkpoints are intact" in text
        assert visible_checkpoints_valid(root) == sorted(["best", "latest", "latest_backup", "milestone_0000004",
                                                          "step_0000002", "step_0000004"])
        assert manifest(root / "latest")["step"] == 4
        filler.unlink()  # space again: resume continues exactly where the last good checkpoint was
        run_cli(*train_args(out, resume_from_checkpoint="latest"), check=True)
        assert losses(out) == losses(reference)
