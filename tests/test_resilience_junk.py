"""Issues 13 and 19: a stretch of junk documents in the training data (read in order) leaves the model as good as
a run on clean data, with the default defences, wherever the stretch starts; without them it is damaged.

The recipe is the quickstart GPT-2 on tiny Shakespeare with ``--shuffle false``, scaled to fit CI: 512 tokens
per step (quickstart: 1,024), 120 steps, ~13k junk tokens (~25 steps). The junk starts at three positions, each
with its own mechanism:

* step 20: the update guard judges losses from step 9 on and there is no checkpoint before the stretch (the
  quickstart saves every 40 steps): every junk update is skipped and the skipped updates are given back to the
  schedule (the "rewind"). The guard before issue 19 was blind until step 64 here.
* step 59: skipped while the guard's window is still filling, then rolled back to the step-40 checkpoint (the
  position where the guard before issue 19 let the junk through and learned it).
* step 81: skipped, then rolled back to the step-80 checkpoint (issue 13's measurement).

Everything else, the defences included, is at its default. docs/resilience.md has the full-size measurement
(1,024 tokens per step, 200 steps, 26k junk tokens). One clean run serves all positions: its corpus holds the
same junk at its very end, never read in 120 steps, so every corpus has the same number of training tokens and
all runs read the same tokens with the same seed up to their junk. A run whose junk starts after step 40 (80)
therefore resumes from the clean run's step-40 (80) checkpoint (a resume continues a run bitwise, see
test_checkpoint_e2e.py); the defended runs get that checkpoint copied into their own checkpoint folder, where
a rollback looks for it, as if they had saved it themselves. The step-20 runs start from scratch. Runs that do
not wait for each other go two at a time (CI has two cores; one run of this model keeps about one busy).

The defended step-81 run is also the rollback-then-crash test: it is killed with kill -9 just after its rollback
and resumed with ``--resume_from_checkpoint auto``; the skipped data must stay skipped. A run from the same
prefix allows no rollback (``--max_rollbacks 0``) and must stop with exit code 4 and one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_cli
from tests.junk_corpus import write_corpus
from tests.test_resilience_e2e import wait_for

STEPS, TOKENS_PER_STEP, JUNK_TOKENS, CHECKPOINT_STEPS = 120, 512, 13_000, 40
POSITIONS = (20, 59, 81)
JUNK_AT = 81  # the position of the kill -9 and --max_rollbacks 0 runs
# HellaSwag is off (not under test, and it would only add scoring time); trackers and defences are defaults.
RECIPE = ["--preset", "quickstart", "--shuffle", "false", "--max_steps", str(STEPS), "--total_batch_size",
          str(TOKENS_PER_STEP), "--per_device_train_batch_size", "8", "--hellaswag", "false"]
OFF = ["--skip_outlier_updates", "false", "--rollback_after", "0"]
# A junk run continues the clean run's position from its checkpoint on the junk copy (same windows, other bytes),
# which a resume refuses unless told; its rollback reloads that checkpoint too, so the whole run gets the flag.
OTHER = ["--resume_on_other_data", "true"]
TIMEOUT = 1800  # per run: two at a time on a busy 2-core machine (a hang still fails the test)


def prepare(jsonl: Path) -> Path:
    out = jsonl.parent / "data"
    run_cli("prepare-data", "--source", str(jsonl), "--output_dir", str(out), "--val_tokens", "20000", "--num_proc",
            "1", "--no_progress", check=True)
    return out


def val_loss(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/val_loss" in x]
    return [r for r in rows if r["step"] == STEPS][-1]["eval/val_loss"]


def text(p: Path) -> str:
    return p.read_text() if p.exists() else ""


def skipped_steps(out: Path) -> list[int]:
    """The step numbers of every update the guard skipped, from train.log's warnings."""
    return [int(s) for line in text(out / "train.log").splitlines() if "update guard: skipped" in line
            for s in re.findall(r"(?:^|, )(\d+) \(", line.split(": step ", 1)[1])]


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", *RECIPE, "--data_dir", str(data), "--output_dir", str(out), *extra, check=True,
                   timeout=TIMEOUT)


def defended_81_killed_after_its_rollback(data: Path, out: Path, prefix: Path) -> None:
    """The default run from the step-80 prefix, killed with kill -9 after its rollback saved, then resumed."""
    args = ["train", *RECIPE, "--data_dir", str(data), "--output_dir", str(out), *OTHER]
    with open(out.parent / f"{out.name}-1.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hf_gpt2_train", *args, "--resume_from_checkpoint",
                                 str(prefix)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            train_log = out / "train.log"
            wait_for(lambda: "rollback 1/" in text(train_log), proc, "the rollback")
            wait_for(lambda: "saved checkpoint latest" in text(train_log).split("rollback 1/")[1], proc,
                     "the save that follows the rollback")
            proc.kill()  # kill -9 as it replays from step 80
            assert proc.wait() == -9
        finally:
            if proc.poll() is None:
                proc.kill()
    run_cli(*args, "--resume_from_checkpoint", "auto", check=True, timeout=TIMEOUT)  # the resume: auto finds the latest checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("junk")
    out: dict[str, Any] = {"clean": root / "clean-run"}
    # Independent runs go two at a time: a run of this small model keeps about one of CI's two cores busy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        corpora = {at: pool.submit(lambda at=at: prepare(write_corpus(
            root / f"junk-{at}" / "docs.jsonl", shared_data, at, TOKENS_PER_STEP, JUNK_TOKENS))) for at in POSITIONS}
        clean_data = prepare(write_corpus(root / "clean" / "docs.jsonl", shared_data, None, TOKENS_PER_STEP,
                                          JUNK_TOKENS, junk_at_end=True))
        # checkpoints at steps 40, 80 and 120 (the quickstart's checkpoint_steps)
        clean_run = pool.submit(train, clean_data, out["clean"])
        jobs = []
        for at in POSITIONS:
            data = corpora[at].result()
            start = (at - 1) // CHECKPOINT_STEPS * CHECKPOINT_STEPS  # the newest clean checkpoint before the junk
            defended, undefended = root / f"defended-{at}", root / f"undefended-{at}"
            out[f"defended-{at}"], out[f"undefended-{at}"] = defended, undefended
            if not start:
                jobs += [pool.submit(train, data, defended), pool.submit(train, data, undefended, *OFF)]
                continue
            clean_run.result()
            clean_prefix = out["clean"] / "checkpoints" / f"step_{start:07d}"
            prefix = defended / "checkpoints" / clean_prefix.name
            shutil.copytree(clean_prefix, prefix)  # as if the defended run had saved it itself
            if at == JUNK_AT:
                jobs.append(pool.submit(defended_81_killed_after_its_rollback, data, defended, prefix))
                # No rollback allowed: the same stretch stops the run (it ends at step 110, where the rollback
                # would be).
                out["limited_proc"] = pool.submit(
                    run_cli, "train", *RECIPE, "--data_dir", str(data), "--output_dir", str(root / "limited"),
                    "--resume_from_checkpoint", str(clean_prefix), "--max_rollbacks", "0", *OTHER, timeout=TIMEOUT)
            else:
                jobs.append(pool.submit(train, data, defended, "--resume_from_checkpoint", str(prefix), *OTHER))
            jobs.append(pool.submit(train, data, undefended, "--resume_from_checkpoint", str(clean_prefix), *OFF,
                                    *OTHER))
        for job in jobs:
            job.result()  # a failed run fails the fixture
        out["limited_proc"] = out["limited_proc"].result()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("at", POSITIONS)
def test_junk_stretch_with_default_defences_ends_as_good_as_clean_data(runs: dict[str, Any], at: int) -> None:
    clean, defended, undefended = (val_loss(runs[k]) for k in ("clean", f"defended-{at}", f"undefended-{at}"))
    print(f"junk at step {at}: val_loss @ {STEPS}: clean {clean:.4f}, defaults {defended:.4f}, defences off "
          f"{undefended:.4f}")
    assert undefended - clean > 0.08, (clean, defended, undefended)  # the junk does damage: the test can fail
    # No damage with the defaults. Only this side is asserted: after the skipped range the defended run reads the
    # same text in other 64-token windows, and the val loss of a run over ordered text moves by a few hundredths
    # with that (the step-20 run ended 0.063 *below* the clean one on 2026-12-04).
    assert defended - clean < 0.08, (clean, defended, undefended)
    skipped = skipped_steps(runs[f"defended-{at}"])
    assert skipped and min(skipped) in (at, at + 1) and len(skipped) >= 20, skipped  # from its first junk step
    log = text(runs[f"defended-{at}"] / "train.log")
    if at < CHECKPOINT_STEPS:  # no checkpoint before the junk: the skipped updates are given back to the schedule
        assert re.search(rf"rollback 1/3 at step \d+: .*no checkpoint from before step {at}.*continuing at step", log)
    else:
        assert f"reloaded step {(at - 1) // CHECKPOINT_STEPS * CHECKPOINT_STEPS}" in log


@pytest.mark.slow
def test_clean_and_undefended_runs_skip_nothing(runs: dict[str, Any]) -> None:
    """The defaults change nothing on clean data (no skip, no rollback; the guard judges it from step 9 on), and
    with the defences off nothing is skipped either."""
    for name in ("clean", *(f"undefended-{at}" for at in POSITIONS)):
        log = text(runs[name] / "train.log")
        assert "skipped" not in log and "rollback" not in log and "spike at" not in log, name


@pytest.mark.slow
def test_skipped_steps_and_the_rollback_are_reported(runs: dict[str, Any]) -> None:
    log = text(runs[f"defended-{JUNK_AT}"] / "train.log")
    skipped = skipped_steps(runs[f"defended-{JUNK_AT}"])
    assert "rollback 1/3 at step" in log and "reloaded step 80" in log
    assert f"{len(skipped)} updates skipped" in log.split("rollback 1/3", 1)[1].splitlines()[0]
    # The skip counts of steps 81-110 were logged, then dropped from the curves by the resume from step 80 (a
    # resume purges what was logged after its step); the rollback is logged at step 80, where the run went on.
    rows = [json.loads(x) for x in (runs[f"defended-{JUNK_AT}"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/rollbacks" in r] == [80]
    assert {r["train/skipped_updates"] for r in rows if "train/loss" in r} == {0}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((runs[f"defended-{JUNK_AT}"] / "runs").rglob("events.out.tfevents*")).parent
    tb = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    tags = set(tb.Tags()["scalars"]) | set(tb.Tags()["tensors"])
    assert {"train/rollbacks", "train/skipped_updates"} <= tags and any("events/rollback" in t for t in tags)


@pytest.mark.slow
def test_rollback_then_kill_9_then_resume_keeps_the_bad_data_skipped(runs: dict[str, Any]) -> None:
    out = runs[f"defended-{JUNK_AT}"]
    log = (out / "train.log").read_text()
    after_resume = log.rsplit("resumed from", 1)[1]
    assert "skipped" not in after_resume and "rollback" not in after_resume  # the junk was not read again
    final = out / "checkpoints" / "final"
    state = torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)
    loader = torch.load(final / "custom_checkpoint_1.pkl", weights_only=False)
    [event] = state["rollbacks"]
    assert loader["skipped"] == [event["skipped_sequences"]] and event["to_step"] == 80
    first, end = event["skipped_sequences"]
    seq_len = 64
    assert first * seq_len in ((JUNK_AT - 1) * TOKENS_PER_STEP, JUNK_AT * TOKENS_PER_STEP)  # the first bad step ...
    assert abs((end - first) * seq_len - JUNK_TOKENS) <= 2 * TOKENS_PER_STEP  # ... over the junk


@pytest.mark.slow
def test_a_spike_beyond_max_rollbacks_stops_with_one_line(runs: dict[str, Any]) -> None:
    from hf_gpt2_train.errors import EXIT_SPIKE

    proc = runs["limited_proc"]
    assert proc.returncode == EXIT_SPIKE, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("hf-gpt2-train:")]
    assert len(lines) == 1 and "after 0 rollback(s), the limit (--max_rollbacks 0)" in lines[0], proc.stderr[-3000:]
    assert "raise --max_rollbacks" in lines[0] and "Traceback" not in proc.stderr
