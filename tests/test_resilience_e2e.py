"""Runs that heal themselves, end to end through the real CLI: a rank that hangs (SIGSTOP) under torchrun, a
worker killed by kill -9 under ``torchrun --max_restarts``, and a stretch of junk data (see
test_resilience_junk.py). Multi-process runs use gloo on the CPU, as on CPU CI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hf_gpt2_train.errors import EXIT_HANG

# The small configuration of test_checkpoint_e2e (1-layer GPT-2, 256 tokens per step). HellaSwag is off: it
# is not under test and its download/scoring would only slow the runs; trackers stay at their default.
SMALL = {"preset": "quickstart", "n_layer": 1, "n_embd": 32, "n_head": 2, "total_batch_size": 256,
         "per_device_train_batch_size": 2, "seq_len": 64, "hellaswag": "false", "val_batches": 1,
         "sample_max_new_tokens": 0, "logging_steps": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, log: Path, *extra: str, env: dict[str, str] | None = None, **over: object
             ) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 EXTRA -m hf_gpt2_train train`` on gloo; a random free --master_port unless
    EXTRA chooses the rendezvous (--standalone)."""
    if "--standalone" not in extra:
        extra = ("--master_port", str(free_port()), *extra)
    args = ["train", "--output_dir", str(out)]
    for k, v in {**SMALL, **over}.items():
        args += [f"--{k}", str(v)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    f = open(log, "w")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *extra,
                             "-m", "hf_gpt2_train", *args],
                            stdout=f, stderr=subprocess.STDOUT, env=env)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes torchrun started, by rank."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "hf_gpt2_train" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child
    return out


def logged_steps(out: Path) -> list[int]:
    try:
        return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    except FileNotFoundError:
        return []


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 1200) -> None:
    """Poll ``cond`` until it holds; fail if ``proc`` exits first or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_tree(proc: subprocess.Popen, known: list[psutil.Process]) -> None:
    """Leave nothing behind (a stopped worker included), whatever the test's outcome."""
    try:
        known = [*known, *psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        pass
    for p in known:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_sigstopped_rank_ends_the_run_within_the_hang_timeout_with_stacks(tmp_path: Path) -> None:
    """One rank of a 2-process run stops (SIGSTOP: alive, silent, as a rank stuck in a driver). The other waits
    in a collective; its watchdog dumps its threads' stacks and exits with code 5 within the timeout, and
    torchrun ends the run (after a worker failure it SIGKILLs the stopped rank 30 s after its SIGTERM, whatever
    --shutdown_timeout says): all within the timeout plus one minute. The collective timeout in effect is the
    configured one."""
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    timeout_min = 0.25
    proc = torchrun(out, log, max_steps=100_000, hang_timeout_minutes=timeout_min, collective_timeout_minutes=30)
    ranks: dict[int, psutil.Process] = {}
    try:
        wait_for(lambda: len(logged_steps(out)) >= 2, proc, "two logged steps", 300)
        ranks = workers(proc)
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=timeout_min * 60 + 60 + 30)  # the bound, plus slack for a loaded machine to report
        elapsed = time.monotonic() - stopped
    finally:
        kill_tree(proc, list(ranks.values()))
    text = log.read_text()
    assert proc.returncode != 0 and elapsed < timeout_min * 60 + 60, (proc.returncode, elapsed, text[-3000:])
    assert f"exitcode  : {EXIT_HANG}" in text, text[-3000:]
    dumps = list((out / "hang").glob("rank0_pid*.txt"))
    assert len(dumps) == 1 and not list((out / "hang").glob("rank1_*"))  # the stopped rank cannot dump
    stacks = dumps[0].read_text()
    assert "collective timeout in effect: 1800.0 s" in stacks  # --collective_timeout_minutes 30 reached the group
    assert 'trainer.py", line' in stacks and " in train" in stacks  # where rank 0 waited: in the training loop
    assert "hang watchdog: no training step completed" in (out / "train.log").read_text()


@pytest.mark.slow
def test_torchrun_max_restarts_restarts_a_killed_worker_and_finishes(tmp_path: Path) -> None:
    """README's unattended run: torchrun --standalone --max_restarts 2 with --resume_from_checkpoint auto. A
    worker killed by kill -9 after the first checkpoints makes torchrun restart both processes; they resume from
    the latest checkpoint and the run finishes with exit 0 and every step logged.

    As README says: --standalone (c10d rendezvous) with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. Without that
    variable torch 2.13 lets the workers share the launcher's store across restarts (static rendezvous always
    does), and the restarted processes can read the previous attempt's addresses: 2 of 5 tries here failed
    with "Gloo connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712); 0 of 4 with it."""
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    # The defaults otherwise (TensorBoard on): the restarted run must also end cleanly with every tracker.
    proc = torchrun(out, log, "--standalone", "--max_restarts", "2", env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                    max_steps=10, checkpoint_steps=2, eval_steps=0, resume_from_checkpoint="auto")
    try:
        wait_for(lambda: (out / "checkpoints" / "step_0000004" / "manifest.json").exists(), proc,
                 "the step-4 checkpoint", 300)
        victim = workers(proc)[0]
        victim.kill()  # kill -9 of the main process
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        kill_tree(proc, [])
    train_log = (out / "train.log").read_text()
    resumed = [line for line in train_log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "(step " in resumed[0], train_log[-3000:]
    assert int(resumed[0].split("(step ")[1].split(",")[0]) >= 4
    assert sorted(set(logged_steps(out))) == list(range(1, 11))
    assert json.loads((out / "checkpoints" / "final" / "manifest.json").read_text())["step"] == 10
