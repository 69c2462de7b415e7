"""`hf-gpt2-train eval`: a real checkpoint (and its HF export) evaluated standalone, as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from hf_gpt2_train.config import Config
from hf_gpt2_train.model import hf_config, to_hf_state_dict
from tests.conftest import run_cli

LIMIT = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A real 2-step quickstart run whose final evaluation (val loss + HellaSwag) is in metrics.jsonl."""
    out = tmp_path_factory.mktemp("evalcli") / "run"
    run_cli("train", "--preset", "quickstart", "--output_dir", str(out), "--max_steps", "2",
            "--total_batch_size", "1024", "--per_device_train_batch_size", "8", "--seq_len", "128", "--val_batches", "2",
            "--hellaswag_path", str(shared_data / "hellaswag_val.jsonl"), "--hellaswag_limit", str(LIMIT),
            "--sample_max_new_tokens", "4", "--report_to", "none", check=True)
    return out


def _final_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in rows if "eval/val_loss" in r]
    return ev


def _eval_args(path: Path, shared_data: Path, *extra: str) -> list[str]:
    return ["eval", str(path), "--data_dir", "embedded", "--val_batches", "2", "--batch_size", "8", "--seq_len",
            "128", "--hellaswag_path", str(shared_data / "hellaswag_val.jsonl"), "--hellaswag_limit", str(LIMIT),
            *extra]


def test_eval_checkpoint_reproduces_the_trainers_evaluation(run_dir, shared_data, tmp_path) -> None:
    out_file = tmp_path / "res" / "eval.json"
    proc = run_cli(*_eval_args(run_dir / "checkpoints" / "final", shared_data, "--output", str(out_file)),
                   check=True)
    res = json.loads(proc.stdout)
    assert json.loads(out_file.read_text()) == res
    assert res["hellaswag_count"] == LIMIT and res["world_size"] == 1
    assert res["val_tokens"] == 2 * 8 * 128
    # same weights, same val batches, same examples as the trainer's final evaluation
    ev = _final_eval(run_dir)
    assert ev["step"] == 2
    assert res["val_loss"] == pytest.approx(ev["eval/val_loss"], rel=1e-6)
    assert res["hellaswag_acc"] == ev["eval/hellaswag_acc"]
    assert res["hellaswag_acc_norm"] == ev["eval/hellaswag_acc_norm"]


def test_eval_hf_export_folder(run_dir, shared_data, tmp_path) -> None:
    """A stock HF GPT-2 folder (Conv1D layout, 50257 rows) of the same weights scores the same."""
    ckpt = run_dir / "checkpoints" / "final"
    cfg = Config.from_dict(json.loads((ckpt / "manifest.json").read_text())["config"])
    model = GPT2LMHeadModel(hf_config(cfg.model, padded=False))
    model.load_state_dict(to_hf_state_dict(load_file(str(ckpt / "model.safetensors")), cfg.model))
    model.tie_weights()
    export = tmp_path / "hf"
    model.save_pretrained(str(export))
    res = json.loads(run_cli(*_eval_args(export, shared_data), check=True).stdout)
    ev = _final_eval(run_dir)
    assert res["val_loss"] == pytest.approx(ev["eval/val_loss"], rel=1e-5)
    assert res["hellaswag_acc_norm"] == ev["eval/hellaswag_acc_norm"]
    assert res["hellaswag_acc"] == ev["eval/hellaswag_acc"]


@pytest.mark.slow
def test_eval_two_processes(run_dir, shared_data) -> None:
    """torchrun with 2 processes: one JSON on stdout; 1 val batch per process = the same 2 batches as above."""
    args = _eval_args(run_dir / "checkpoints" / "final", shared_data)
    args[args.index("--val_batches") + 1] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hf_gpt2_train", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)  # exactly one JSON object: only the main process prints
    ev = _final_eval(run_dir)
    assert res["world_size"] == 2 and res["hellaswag_count"] == LIMIT and res["val_tokens"] == 2 * 8 * 128
    assert res["val_loss"] == pytest.approx(ev["eval/val_loss"], rel=1e-6)
    assert res["hellaswag_acc"] == ev["eval/hellaswag_acc"]
    assert res["hellaswag_acc_norm"] == ev["eval/hellaswag_acc_norm"]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_eval_bad_input(run_dir, shared_data, tmp_path) -> None:
    _assert_one_line_error(run_cli("eval", str(tmp_path / "nope")), "does not exist")
    # an output folder instead of one of its checkpoints: name the checkpoint to pass
    _assert_one_line_error(run_cli("eval", str(run_dir)), str(run_dir / "checkpoints" / "final"))
    _assert_one_line_error(run_cli("eval", str(run_dir / "checkpoints" / "final"), "--hellaswag_path",
                                   str(tmp_path / "missing.jsonl")), "--hellaswag_path")
    _assert_one_line_error(run_cli("eval", str(run_dir / "checkpoints" / "final"), "--no_hellaswag"),
                           "--data_dir")
    _assert_one_line_error(run_cli(*_eval_args(run_dir / "checkpoints" / "final", shared_data, "--seq_len", "512")),
                           "--seq_len")
