"""`GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh OUT` as CI runs it: the device check's every step on CPU at the
quickstart size, with `datasets` made absent as on the GPU machine. Every step must be `ok`, and the JSON must hold
what the GPU run will be read for (bench rows for each precision, resumed losses equal, an export that loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

STEPS = ["env", "data", "bench_gpt2", "bench_gpt2_large", "train_resume", "fsdp2", "saves", "bench_gpt2_real_vocab_logits",
         "bench_gpt2_fp8_lm_head", "memory_modes", "muon"]


@pytest.mark.slow
def test_dry_run_writes_every_step_ok(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable,
           "GPU_CHECK_WORK_DIR": str(tmp_path / "work")}
    proc = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == STEPS
    failed = {n: s.get("error") for n, s in steps.items() if s["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0 and doc["all_ok"] and doc["dry_run"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]

    env_info = steps["env"]["result"]
    assert env_info["datasets_importable"] is False  # the dry run really ran without `datasets`
    assert env_info["gpt2_vocabulary_offline"] is True and env_info["fp8_backends"]["torchao"] is True
    data = steps["data"]["result"]
    assert data["complete"] and data["tokens"]["train"] > 20_000 and data["tokens"]["val"] >= 5_000
    for name in ("bench_gpt2", "bench_gpt2_large"):
        rows = steps[name]["result"]["precisions"]
        assert set(rows) == {"no", "fp8-ao-emulated", "fp8-te"}
        for prec in ("no", "fp8-ao-emulated"):
            assert rows[prec]["tokens_per_sec"] > 0 and rows[prec]["plain"]["tokens_per_sec"] > 0
        assert "skipped" in rows["fp8-te"]  # no TransformerEngine on CPU: reported, not measured
    assert steps["bench_gpt2_fp8_lm_head"]["result"]["precisions"]["fp8-ao-emulated"]["fp8_coverage"] == 1.0
    resume = steps["train_resume"]["result"]
    assert resume["bitwise_equal"] and resume["compile"] is True and resume["final_loss"] < resume["first_loss"]
    export = steps["fsdp2"]["result"]
    assert export["class"] == "GPT2LMHeadModel" and export["vocab_size"] == 50257 and export["loss_on_text"] < 11.5
    saves = steps["saves"]["result"]  # the three runs' wall times (figures) and the saves each one made
    assert set(saves["wall_s"]) == {"final_only", "sync", "async"} and len(saves["sync_save_s"]) == 2
    assert saves["async_background_saves"] == 1 and saves["command"][-2:] == ["--data_dir", str(tmp_path / "work" / "data")]
    memory = steps["memory_modes"]["result"]["presets"]["quickstart"]["modes"]
    assert set(memory) == {"none", "full", "selective"}
    assert memory["full"]["activation_memory_gb"] < memory["none"]["activation_memory_gb"]
    assert memory["full"]["losses"] == memory["none"]["losses"] == memory["selective"]["losses"]
    muon = steps["muon"]["result"]
    assert muon["muon_step_ms"] > 0 and muon["adamw_step_ms"] > 0 and muon["newton_schulz_dtype"] == "float32"
    assert muon["train_final_loss"] < muon["train_first_loss"]
    summary = (out / "gpu_check.md").read_text()
    assert "dry run" in summary and all(f"| {n} | ok |" in summary for n in STEPS)
