"""README's quickstart as a new user runs it: the exact lines of README.md, a fresh HOME, no TIKTOKEN_*/HF_*
variables, no network, a terminal. One training run per session (the `readme_quickstart` fixture); these
tests and others read it."""

from __future__ import annotations

import json
import re

from tests.conftest import QuickstartRun, train_losses

WARNING_LINE = re.compile(r"\bWARNING\b|\b\w*Warning:")  # our/HF loggers, and Python's warnings module


def _problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if WARNING_LINE.search(line) or "Traceback" in line]


def test_readme_quickstart_trains_offline_with_no_warning(readme_quickstart: QuickstartRun) -> None:
    run = readme_quickstart
    assert run.command.startswith("hf-gpt2-train train --preset quickstart")  # parsed from README.md
    assert "TIKTOKEN_CACHE_DIR" not in run.env and not any(k.startswith("HF_") for k in run.env)
    assert run.returncode == 0, run.output[-4000:]
    assert _problems(run.output) == [], run.output[-4000:]
    assert "HellaSwag is off" in run.output and "--hellaswag_path" in run.output  # the one INFO line

    out = run.output_dir
    losses = train_losses(out)
    first, last = losses[min(losses)], losses[max(losses)]
    assert first > 9.0  # ~ln(50257) at init
    assert last < first - 3.0, (first, last)
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/val_loss" in x]
    assert val and val[-1]["eval/val_loss"] < 7.5
    info = json.loads((out / "run_info.json").read_text())
    assert info["effective_precision"] == "fp32" and info["precision"] == "fp32" and info["world_size"] == 1
    assert info["async_checkpoint"]["enabled"] is False  # the CPU default, chosen at run time and recorded
    assert f"checkpoint saves: {info['async_checkpoint']['reason']}" in (out / "train.log").read_text()
    assert (out / "checkpoints" / "final" / "manifest.json").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # the default tracker (TensorBoard) was on
    assert (out / "train.log").read_text().count("step ") >= 6


def test_readme_follow_up_lines_work_offline(readme_quickstart: QuickstartRun) -> None:
    """README's next lines (checkpoints list, export, pipeline), as written, in the same folder and environment."""
    run = readme_quickstart
    assert run.returncode == 0, run.output[-4000:]
    lines = run.follow_up
    assert [line.split()[:3] for line in lines[:2]] == [["hf-gpt2-train", "checkpoints", "list"],
                                                        ["hf-gpt2-train", "export", "out/quickstart/checkpoints/final"]]
    assert "pipeline('text-generation'" in lines[2]

    listing = run.run_line(lines[0])
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert {"latest", "best", "final"} <= set(rows) and all(r.rstrip().endswith("yes") for r in rows.values()
                                                            if r.split()[0] in ("latest", "best", "final"))

    export = run.run_line(lines[1])
    assert export.returncode == 0, export.stderr[-3000:]
    assert (run.cwd / "out" / "quickstart-hf" / "model.safetensors").is_file()

    generated = run.run_line(lines[2])
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("The meaning of life is") and len(generated.stdout) > len("The meaning of life is")
    for proc in (listing, export, generated):
        assert "Traceback" not in proc.stdout + proc.stderr
    # our own commands print no warning (the pipeline line is transformers' own)
    assert _problems(listing.stdout + listing.stderr + export.stdout + export.stderr) == []
