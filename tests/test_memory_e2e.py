"""`--activation_checkpointing` and `--per_device_train_batch_size auto` through the CLI, as a user runs them.

Each mode trains and resumes, and checkpoints move between modes (none -> full, none -> selective, full -> none):
every run logs, step for step, the losses of the run without checkpointing, bit for bit (CPU fp32: recomputation
is deterministic). `auto` on CPU without a memory limit takes the preset's micro-batch and says so;
under an address-space limit (tests/address_space_harness.py: the kernel refuses allocations past it, torch raises
its real out-of-memory error) it searches with Accelerate's find_executable_batch_size, and a resume keeps the
micro-batch the checkpoint trained with.

The runs keep the quickstart's defaults (TensorBoard on, its evaluation at the end) except 4 steps with a save
every 2, and a loss per step in metrics.jsonl (--logging_steps 1) to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, train_losses

pytestmark = pytest.mark.slow
QUICK = ["--preset", "quickstart", "--max_steps", "4", "--checkpoint_steps", "2", "--logging_steps", "1"]


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("train", *QUICK, "--output_dir", str(out), *args, check=True)


def resume(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """A new output folder that resumes from ``src``'s step-2 checkpoint."""
    return train(out, "--resume_from_checkpoint", str(src / "checkpoints" / "step_0000002"), *args)


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def none_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ac") / "none"
    train(out, "--activation_checkpointing", "none", "--per_device_train_batch_size", "auto")
    return out


def test_auto_on_cpu_without_a_memory_limit_takes_the_preset_micro_batch_and_says_why(none_run: Path) -> None:
    info = run_info(none_run)["micro_batch"]
    assert info["source"] == "preset" and info["chosen"] == 16 and info["requested"] == "auto"
    assert run_info(none_run)["config"]["optim"]["per_device_train_batch_size"] == 16
    log = (none_run / "train.log").read_text()
    assert "per_device_train_batch_size auto on cpu: 16, the quickstart micro-batch, without a search" in log
    assert "ulimit -v" in log


def test_a_run_without_checkpointing_resumes_in_every_mode_with_its_losses(none_run: Path, tmp_path: Path) -> None:
    """none -> full and none -> selective (on every 2nd block): the resumed steps give the losses of the run without
    checkpointing, bit for bit. (full trains and resumes into none in the memory-limit test below.)"""
    ref = train_losses(none_run)
    assert sorted(ref) == [1, 2, 3, 4] and ref[4] < ref[1]
    for mode, every in (("full", "1"), ("selective", "2")):
        out = tmp_path / mode
        proc = resume(none_run, out, "--activation_checkpointing", mode, "--activation_checkpointing_every", every)
        assert "resumed from" in proc.stdout + proc.stderr + (out / "train.log").read_text()
        assert train_losses(out) == {s: ref[s] for s in (3, 4)}, mode
        assert run_info(out)["config"]["run"]["activation_checkpointing"] == mode


HARNESS_HEADROOM_MB = 1200  # 8 sequences of 256 tokens do not fit in it (nor 16), 4 do (docs/benchmarks.md, Memory)
LIMITED = ["--n_positions", "256", "--seq_len", "256", "--total_batch_size", "2048", "--val_batches", "1"]


def test_auto_searches_under_a_real_memory_limit_and_a_resume_keeps_its_micro_batch(tmp_path: Path) -> None:
    """Under the limit, a micro-batch of 8 sequences runs out of memory in its trial (the allocator's own error,
    recognised by Accelerate); the search steps down the divisors of the 8 sequences per step, and training runs at
    the one found (activation checkpointing full). The checkpoint then resumes without the limit and without
    checkpointing (full -> none), with auto: it keeps the micro-batch, and the losses are those of the first run."""
    out = tmp_path / "limited"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # each extra malloc arena reserves 64 MB of address space
    proc = subprocess.run([sys.executable, "-m", "tests.address_space_harness", str(HARNESS_HEADROOM_MB), "train",
                           *QUICK, *LIMITED, "--output_dir", str(out), "--activation_checkpointing", "full",
                           "--per_device_train_batch_size", "auto"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    info = run_info(out)["micro_batch"]
    assert info["source"] == "search" and info["tried"][0] == 8 and 8 in info["out_of_memory"]
    chosen = info["chosen"]
    assert chosen < 8 and 8 % chosen == 0 and info["tried"][-1] == chosen
    assert info["out_of_memory"] == info["tried"][:-1]  # every larger divisor was tried and failed
    assert f"per_device_train_batch_size auto: {chosen}, the largest micro-batch that fits" in (
        out / "train.log").read_text()
    assert run_info(out)["config"]["optim"]["per_device_train_batch_size"] == chosen
    first = train_losses(out)
    assert sorted(first) == [1, 2, 3, 4]

    resumed = tmp_path / "resumed"
    resume(out, resumed, *LIMITED, "--activation_checkpointing", "none", "--per_device_train_batch_size", "auto")
    again = run_info(resumed)["micro_batch"]
    assert again["source"] == "checkpoint" and again["chosen"] == chosen
    assert f"per_device_train_batch_size auto: {chosen}, the micro-batch of the checkpoint" in (
        resumed / "train.log").read_text()
    assert train_losses(resumed) == {s: first[s] for s in (3, 4)}
