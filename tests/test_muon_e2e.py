"""Muon and warmup-stable-decay through the real CLI: bitwise resume, extending a WSD run, --decay_now (and
resuming its cooldown), fp8, DDP on another world size, FSDP2 (DTensor) against one process, export.

All runs use tests/test_checkpoint_e2e.py's small configuration (1 layer, 256 tokens per step, 8 steps, saves every
2 steps, milestone at step 4) with ``--optimizer muon --lr_schedule wsd``: warmup 2 steps, decay over the last
quarter (steps 6-8).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_gpt2_train.config import build_config
from hf_gpt2_train.optim import lr_at
from tests.conftest import free_port, run_cli
from tests.test_checkpoint_e2e import losses, manifest, train_args

MUON = {"optimizer": "muon", "lr_schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.25}


def muon_args(out: Path, **over: object) -> list[str]:
    return train_args(out, **{**MUON, **over})


def lrs(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}


def resumed(reference: Path, tmp: Path, name: str) -> Path:
    """A copy of a finished run to resume: checkpoints hard-linked (never written in place), but the run's own
    files copied, since a resume rewrites metrics.jsonl in place (a link would change the reference's too)."""
    out = tmp / name
    shutil.copytree(reference, out, copy_function=os.link)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
            shutil.copy2(reference / f.name, f)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("muon") / "reference"
    run_cli(*muon_args(out), check=True)
    return out


def test_muon_wsd_trains_and_resumes_bitwise(reference: Path, tmp_path: Path) -> None:
    ref = losses(reference)
    assert sorted(ref) == list(range(1, 9)) and ref[8] < ref[1] - 0.5
    cfg = build_config("quickstart", cli={**MUON, "max_steps": 8})
    assert lrs(reference) == {s: pytest.approx(lr_at(s - 1, cfg)) for s in range(1, 9)}  # warmup, stable, decay
    m = manifest(reference / "checkpoints" / "final")
    assert m["config"]["optim"]["optimizer"] == "muon"
    out = resumed(reference, tmp_path, "run")
    proc = run_cli(*muon_args(out, resume_from_checkpoint="milestone_0000004"), check=True)
    assert "resumed from" in proc.stdout and "WARNING" not in proc.stdout + proc.stderr
    assert losses(out) == ref  # steps 5-8 again, bit for bit (momentum buffers and AdamW moments restored)
    # An AdamW run cannot take Muon's optimizer state: one line naming the fix, nothing written.
    proc = run_cli(*train_args(resumed(reference, tmp_path, "adamw"), resume_from_checkpoint="latest"))
    assert proc.returncode == 2 and "trained with --optimizer muon" in proc.stderr and "Traceback" not in proc.stderr


def test_extending_a_wsd_run_continues_its_stable_phase(reference: Path, tmp_path: Path) -> None:
    """Resumed at step 4 with --max_steps 12, the decay moves from steps 6-8 to 9-12: one info line, no warning,
    and steps 5-8 train with the same lr, so their losses equal the original run's bit for bit."""
    out = resumed(reference, tmp_path, "longer")
    proc = run_cli(*muon_args(out, resume_from_checkpoint="milestone_0000004", max_steps=12), check=True)
    text = proc.stdout + proc.stderr
    assert "WARNING" not in text and "resuming a WSD run with max_steps 8 -> 12: the lr at step 4 stays" in text
    ref, ext = losses(reference), losses(out)
    assert sorted(ext) == list(range(1, 13)) and all(ext[s] == ref[s] for s in range(1, 9))
    assert lrs(out)[7] == lrs(reference)[7] and lrs(out)[8] > lrs(reference)[8]  # old decay at 8, new from 10


def test_decay_now_cools_down_from_a_checkpoint_and_its_cooldown_resumes_exactly(reference: Path,
                                                                                  tmp_path: Path) -> None:
    """--decay_now from step 4 with decay_fraction 0.5: the decay takes steps 5-8 (half of an 8-step run); the new
    schedule is what the checkpoints record. Resumed from inside that cooldown with the same command line, the
    cooldown continues (not restarts): the same losses bit for bit."""
    cool = resumed(reference, tmp_path, "cool")
    flags = {"resume_from_checkpoint": "milestone_0000004", "decay_now": "true", "decay_fraction": 0.5,
             "max_steps": 100}
    text = run_cli(*muon_args(cool, **flags), check=True).stdout
    assert "--decay_now: the lr decays (1 - sqrt) from step 4 to" in text and "max_steps is now 8" in text
    assert "WARNING" not in text
    cfg = build_config("quickstart", cli={**MUON, "decay_fraction": 0.5, "max_steps": 8})
    assert {s: lr for s, lr in lrs(cool).items() if s > 4} == {s: pytest.approx(lr_at(s - 1, cfg)) for s in range(5, 9)}
    assert lrs(cool)[5] == lrs(reference)[4] > lrs(cool)[6] > lrs(cool)[8]
    final = manifest(cool / "checkpoints" / "final")["config"]["optim"]
    assert (final["max_steps"], final["decay_now"], final["decay_fraction"]) == (8, False, 0.5)
    assert json.loads((cool / "run_info.json").read_text())["config"]["optim"]["max_steps"] == 8
    again = resumed(cool, tmp_path, "again")
    proc = run_cli(*muon_args(again, **{**flags, "resume_from_checkpoint": "step_0000006"}), check=True)
    assert "step 6 is already in the decay that started at step 4: continuing it to step 8" in proc.stdout
    assert losses(again) == losses(cool)
    # Without a checkpoint to cool down from: one line, exit 2, nothing written.
    fresh = tmp_path / "fresh"
    proc = run_cli(*muon_args(fresh, resume_from_checkpoint="auto", decay_now="true"))
    assert proc.returncode == 2 and "--decay_now: there is no checkpoint" in proc.stderr
    assert not [p for p in fresh.rglob("*") if p.is_file()]


def test_muon_runs_in_emulated_fp8(tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    run_cli(*muon_args(out, max_steps=4, eval_steps=0, checkpoint_steps=0, milestone_steps=0, mixed_precision="fp8",
                       fp8_emulate="true", fp8_min_dim=16), check=True)
    info = json.loads((out / "run_info.json").read_text())
    assert info["effective_precision"] == "fp8-ao-emulated" and info["fp8_block_coverage"] == 1.0
    ls = losses(out)
    assert all(torch.isfinite(torch.tensor(v)) for v in ls.values()) and ls[4] < ls[1]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def torchrun(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, "--master_port", str(free_port()), "-m", module, *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1", **env})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def close(a: dict[int, float], b: dict[int, float], steps: range, rel: float) -> bool:
    return all(abs(a[s] - b[s]) <= rel * abs(b[s]) for s in steps)


@pytest.mark.slow
def test_ddp_resumes_a_one_process_muon_checkpoint_on_two_processes(reference: Path, tmp_path: Path) -> None:
    """Another world size: the 1-process step-4 checkpoint continues on 2 DDP processes (same global batch;
    float32 reductions in another order, so equal to rounding)."""
    out = resumed(reference, tmp_path, "ddp")
    torchrun("hf_gpt2_train", muon_args(out, resume_from_checkpoint="milestone_0000004"), {"OMP_NUM_THREADS": "1"})
    assert manifest(out / "checkpoints" / "final")["world_size"] == 2
    assert close(losses(out), losses(reference), range(5, 9), 1e-5), (losses(out), losses(reference))


@pytest.mark.slow
def test_fsdp2_muon_matches_one_process_and_exports_a_stock_gpt2(reference: Path, tmp_path: Path,
                                                                  shared_data: Path) -> None:
    """Under FSDP2 every Muon matrix is a DTensor shard: the update is orthogonalised as the whole matrix, so the
    2-process run follows the 1-process one (orthogonalising shards would not); its export is a stock GPT-2."""
    from transformers import GPT2LMHeadModel

    from hf_gpt2_train.hub.export import export_hf
    from hf_gpt2_train.model import load_trained_model

    out = tmp_path / "fsdp"
    torchrun("tests.fsdp_harness", muon_args(out), {"FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "OMP_NUM_THREADS": "1"})
    assert close(losses(out), losses(reference), range(1, 9), 1e-4), (losses(out), losses(reference))
    ckpt = out / "checkpoints" / "final"
    export = export_hf(ckpt, tmp_path / "hf", tokenizer_file=str(shared_data / "gpt2.tiktoken"))
    card = (export / "README.md").read_text()
    assert "Muon on the block matrices (peak lr 0.02" in card and "warmup-stable-decay" in card
    hf = GPT2LMHeadModel.from_pretrained(str(export)).eval()
    ours, _ = load_trained_model(str(ckpt))
    x = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x).logits[..., :50257], atol=1e-4)
