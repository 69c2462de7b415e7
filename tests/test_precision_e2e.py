"""fp8 as a user meets it on CPU: the fp8 accelerate profile launched for real with --fp8_emulate, a run that
resumes fp8 -> fp32 -> fp8, the export of an fp8 run loading in transformers, and the fallback recorded in
run_info.json when torchao is really missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli

pytest.importorskip("torchao.float8", reason="torchao is a dev dependency (pip install torchao)")

# Small steps: quickstart model, 256 tokens per step, no trackers/HellaSwag, fp8 for the 128-wide block matmuls.
SMALL = ["--preset", "quickstart", "--per_device_train_batch_size", "4", "--seq_len", "64",
         "--total_batch_size", "256", "--report_to", "none", "--hellaswag", "false", "--logging_steps", "1",
         "--val_batches", "1", "--eval_steps", "0"]
FP8 = ["--fp8_emulate", "--fp8_min_dim", "16"]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory) -> Path:
    """`accelerate launch` with accelerate_configs/fp8.yaml (fp8 from the profile, not a flag), emulated on CPU."""
    out = tmp_path_factory.mktemp("fp8") / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "fp8.yaml"), "--cpu", "-m", "hf_gpt2_train", "train", *SMALL, *FP8,
           "--output_dir", str(out), "--max_steps", "30", "--warmup_steps", "5", "--checkpoint_steps", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fp8_profile_runs_emulated_fp8_and_learns(fp8_run):
    i = info(fp8_run)
    assert i["config"]["precision"]["mixed_precision"] is None  # requested by the accelerate profile
    assert i["requested_precision"] == "fp8" and i["effective_precision"] == "fp8-ao-emulated"
    assert i["fp8_backend"] == "ao" and i["fp8_block_coverage"] >= 0.9
    assert 0 < i["fp8_coverage"] < i["fp8_block_coverage"]  # lm_head (most FLOPs of this tiny model) stays high
    assert i["fp8_skipped"] == {"lm_head kept in high precision (--fp8_lm_head converts it)": ["lm_head"]}
    assert any("cannot emulate" in w for w in i["precision_warnings"])  # the profile says TE; emulation is torchao
    log = (fp8_run / "train.log").read_text()
    assert "fp8 (ao emulated, coverage " in log and "100.0% of block matmuls" in log
    m = losses(fp8_run)
    assert sorted(m) == list(range(1, 31))
    assert m[1] > 10.0 and sum(m[s] for s in range(26, 31)) / 5 < m[1] - 2.5, m


def test_fp8_run_resumes_in_fp32_and_back_in_fp8(fp8_run, tmp_path):
    # Work on a copy of the output dir so the module fixture stays untouched for the other tests.
    import shutil

    out = tmp_path / "run"
    shutil.copytree(fp8_run, out, symlinks=True)
    run_cli("train", *SMALL, "--output_dir", str(out), "--mixed_precision", "no", "--max_steps", "32",
            "--warmup_steps", "5", "--resume_from_checkpoint", "latest", check=True)
    assert info(out)["effective_precision"] == "fp32" and info(out)["fp8_layers"] == 0
    run_cli("train", *SMALL, *FP8, "--output_dir", str(out), "--mixed_precision", "fp8", "--max_steps", "34",
            "--warmup_steps", "5", "--resume_from_checkpoint", "latest", check=True)
    i = info(out)
    assert i["effective_precision"] == "fp8-ao-emulated" and i["fp8_layers"] == 8
    m = losses(out)
    assert sorted(m) == list(range(1, 35))  # every step once: 1-30 fp8, 31-32 fp32, 33-34 fp8
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert max(m[31], m[32], m[33], m[34]) < m[1] - 2.0  # the resumed runs kept the trained weights


def test_export_of_an_fp8_run_is_a_plain_transformers_gpt2(fp8_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_gpt2_train.model import load_trained_model

    export = tmp_path / "export"
    run_cli("export", str(fp8_run / "checkpoints" / "final"), "--out", str(export), check=True)
    keys = load_file(str(export / "model.safetensors")).keys()
    assert not [k for k in keys if "extra_state" in k or "float8" in k.lower()]
    hf = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ours, mcfg = load_trained_model(str(fp8_run / "checkpoints" / "final"))
    ids = torch.tensor([[464, 3616, 286, 1204, 318, 257, 1332, 13]])
    with torch.no_grad():
        ref = ours(input_ids=ids).logits[..., :mcfg.vocab_size]
        got = hf(input_ids=ids).logits[..., :mcfg.vocab_size]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_missing_torchao_falls_back_to_fp32_and_run_info_says_so(tmp_path):
    # sitecustomize runs at interpreter start: None in sys.modules is how Python marks a module unimportable,
    # so `import torchao` fails and importlib's find_spec reports it absent, as on a machine without it.
    blocker = tmp_path / "no_torchao"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torchao'] = None\n")
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    run_cli("train", *SMALL, *FP8, "--mixed_precision", "fp8", "--output_dir", str(out), "--max_steps", "2",
            env=env, check=True)
    i = info(out)
    assert i["requested_precision"] == "fp8" and i["effective_precision"] == "fp32"
    assert i["fp8_backend"] is None and i["fp8_coverage"] == 0.0
    assert len(i["precision_warnings"]) == 1 and "torchao is not importable" in i["precision_warnings"][0]
    log = (out / "train.log").read_text()
    assert "WARNING fp8 requested but torchao is not importable" in log and "(requested fp8)" in log
