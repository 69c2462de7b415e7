"""`hf-gpt2-train bench` as a user runs it on CPU: real training steps of ours and of the plain loop, a table,
and a JSON file with the documented fields. Timings are not asserted (2 shared cores), their consistency is."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli

TINY_FLAGS = ["--preset", "quickstart", "--per_device_train_batch_size", "2", "--seq_len", "64",
              "--total_batch_size", "256", "--fp8_min_dim", "16"]


def test_bench_on_cpu_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench" / "cpu.json"
    proc = run_cli("bench", "--precisions", "no,fp8-ao-emulated,fp8-te", "--steps", "1", "--warmup", "0",
                   "--repeats", "2", "--output", str(out), *TINY_FLAGS, timeout=900, check=True)
    doc = json.loads(out.read_text())
    assert doc["preset"] == "quickstart" and doc["tokens_per_step"] == 256 and doc["repeats"] == 2
    runs = doc["precisions"]
    assert list(runs) == ["no", "fp8-ao-emulated", "fp8-te"]

    for name in ("no", "fp8-ao-emulated"):
        r = runs[name]
        assert r["effective_precision"] == {"no": "fp32"}.get(name, name) and r["grad_accum_steps"] == 2
        for loop in (r, r["plain"]):
            assert len(loop["step_times_ms"]) == 2 and all(t > 0 for t in loop["step_times_ms"])
            assert loop["tokens_per_sec"] * loop["step_time_ms"] / 1000 == pytest.approx(doc["tokens_per_step"])
            assert loop["mfu"] is None and loop["peak_memory_gb"] is None  # CPU: no known peak, no CUDA memory
        assert r["overhead_ratio"] > 0 and math.isfinite(r["overhead_ratio"])
    assert runs["no"]["fp8_backend"] is None
    assert runs["fp8-ao-emulated"]["fp8_backend"] == "ao" and runs["fp8-ao-emulated"]["fp8_block_coverage"] == 1.0
    # TE cannot run on CPU: reported, not measured, and never disguised as another precision.
    assert set(runs["fp8-te"]) == {"requested", "effective_precision", "skipped"}
    assert "fp8-capable GPU" in runs["fp8-te"]["skipped"]
    assert doc["overhead_ratio"] == max(runs["no"]["overhead_ratio"], runs["fp8-ao-emulated"]["overhead_ratio"])

    table = proc.stdout
    assert "fp8-te           skipped:" in table and f"wrote {out}" in table
    assert f"{runs['no']['overhead_ratio']:7.3f}x" in table


def test_bench_rejects_an_unknown_precision_in_one_line():
    proc = run_cli("bench", "--precisions", "no,fp7", *TINY_FLAGS, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fp7" in lines[0] and "--precisions" in lines[0]


def test_a_failing_precision_is_recorded_and_the_others_are_still_measured(tmp_path):
    """fp8-te really cannot run here: TransformerEngine is not installed and cannot emulate fp8, so with
    --fp8_emulate its plan raises. bench records that as `failed` with the reason, measures the precision after
    it, writes the JSON and exits 1."""
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--precisions", "fp8-te,no", "--fp8_emulate", "true", "--steps", "1", "--warmup", "0",
                   "--repeats", "1", "--output", str(out), *TINY_FLAGS, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "fp8-te failed" in proc.stderr
    runs = json.loads(out.read_text())["precisions"]
    assert set(runs["fp8-te"]) == {"requested", "failed"}
    assert "TransformerEngine cannot emulate" in runs["fp8-te"]["failed"]
    assert runs["no"]["effective_precision"] == "fp32" and runs["no"]["tokens_per_sec"] > 0
    assert "fp8-te           failed: ConfigError: " in proc.stdout


def test_static_memory_counts_the_optimizer_state_once_it_exists():
    """bench's static memory (parameters + AdamW moments), measured at each timed segment's start: after a step,
    AdamW holds two fp32 moments per parameter (8 bytes each), so a step triples the 4 bytes/param of the weights
    (the tied lm_head/embedding counted once)."""
    import torch

    from hf_gpt2_train.bench import static_bytes
    from hf_gpt2_train.config import ModelConfig
    from hf_gpt2_train.model import build_model

    model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    weights = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields the tied weight once
    assert static_bytes(model, opt, "cpu") == weights  # before the first step AdamW has no state yet
    x = torch.randint(0, 50257, (2, 16))
    model(input_ids=x, targets=x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert static_bytes(model, opt, "cpu") == 3 * weights + steps
    assert static_bytes(model, opt, "cuda") == 0  # nothing of it on a GPU here
