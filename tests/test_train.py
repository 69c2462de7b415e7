"""End-to-end training on real text (the embedded corpus / tiny Shakespeare), as a user runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, run_cli

REFERENCE = REPO / "tests" / "reference" / "quickstart_loss.json"
# Small and fast: quickstart model, no trackers/HellaSwag unless a test needs them.
FAST = ["--preset", "quickstart", "--report_to", "none", "--hellaswag", "false", "--logging_steps", "1"]


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_fixed_seed_reference_loss_curve(tmp_path):
    """A fixed-seed run reproduces the recorded loss curve (catches silent regressions in model/data/optim).

    Regenerate after an intended change with UPDATE_REFERENCE=1.
    """
    out = tmp_path / "ref"
    run_cli("train", *FAST, "--output_dir", str(out), "--max_steps", "20", "--eval_steps", "0",
            "--checkpoint_steps", "0", check=True)
    curve = {str(s): round(r["train/loss"], 5) for s, r in sorted(metrics(out).items())}
    if os.environ.get("UPDATE_REFERENCE"):
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(curve, indent=1) + "\n")
    ref = json.loads(REFERENCE.read_text())
    assert list(curve) == list(ref)
    for step, loss in ref.items():
        assert curve[step] == pytest.approx(loss, abs=2e-3), (step, curve[step], loss)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 micro-batches of 4 accumulate to the same update as one batch of 16 (same tokens per step)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*FAST, "--max_steps", "4", "--eval_steps", "0", "--checkpoint_steps", "0"]
    run_cli("train", *common, "--output_dir", str(a), "--per_device_train_batch_size", "16", check=True)
    run_cli("train", *common, "--output_dir", str(b), "--per_device_train_batch_size", "4", check=True)
    ma, mb = metrics(a), metrics(b)
    for s in ma:
        assert ma[s]["train/loss"] == pytest.approx(mb[s]["train/loss"], abs=1e-4)


def test_learning_rate_is_warmup_then_cosine(tmp_path):
    from hf_gpt2_train.config import build_config
    from hf_gpt2_train.optim import lr_at

    cfg = build_config("gpt2")
    assert lr_at(0, cfg) == pytest.approx(6e-4 / 715)
    assert lr_at(714, cfg) == pytest.approx(6e-4)
    assert lr_at(19073, cfg) == pytest.approx(6e-5)
    mid = (715 + 19073) // 2
    assert lr_at(mid, cfg) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=1e-3)


def test_existing_output_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_cli("train", *FAST, "--output_dir", str(out), "--max_steps", "2", "--eval_steps", "0", check=True)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = run_cli("train", *FAST, "--output_dir", str(out), "--max_steps", "4")
    assert proc.returncode == 2 and "--resume_from_checkpoint latest" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_nonfinite_loss_stops_with_clear_message_and_finite_checkpoint(tmp_path):
    """A huge learning rate blows up: the run stops (exit 3) naming the fix; saved weights stay finite."""
    from safetensors.torch import load_file

    out = tmp_path / "nan"
    proc = run_cli("train", *FAST, "--output_dir", str(out), "--max_steps", "40", "--learning_rate", "1e30",
                   "--warmup_steps", "1", "--max_grad_norm", "0", "--checkpoint_steps", "1", "--eval_steps", "0")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "--on_nonfinite skip" in proc.stderr
    ckpts = [p for p in (out / "checkpoints").iterdir() if (p / "model.safetensors").exists()]
    assert ckpts
    for c in ckpts:
        for name, t in load_file(str(c / "model.safetensors")).items():
            assert t.isfinite().all(), (c.name, name)


def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP on 2 CPU processes (gloo) sees the same global batches as 1 process: same losses."""
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_steps", "3", "--eval_steps", "0", "--checkpoint_steps", "0", "--per_device_train_batch_size", "8"]
    run_cli("train", *FAST, *common, "--output_dir", str(one), check=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # The 2-process run keeps the default trackers (TensorBoard): the end of a multi-process run with them
    # (end_training destroys the process group) must exit 0 with no traceback.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "hf_gpt2_train", "train", "--preset", "quickstart",
                           "--logging_steps", "1", *common, "--output_dir", str(two)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert list((two / "runs").rglob("events.out.tfevents.*"))
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    m1, m2 = metrics(one), metrics(two)
    assert set(m1) == set(m2)
    for s in m1:
        assert m1[s]["train/loss"] == pytest.approx(m2[s]["train/loss"], abs=1e-4)
