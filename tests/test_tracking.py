"""What the user sees while training: the terminal (under a real pseudo-terminal), honest throughput when
evaluations are slow, samples that render as Markdown blocks, the schedule-change warning on resume."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QuickstartRun, run_cli

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
BAR = re.compile(r"train: +\d+%\|")
CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


# ----------------------------------------------------------------------------------------- the terminal
def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: \\r returns to column 0 and overwrites, \\n moves down, ESC[nA up."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        m = CSI.match(raw, i)
        if m:
            if m.group(2) == "A":
                row = max(0, row - int(m.group(1) or 1))
            i = m.end()
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1) if col >= len(line) else "")
            line[col] = ch
            col += 1
    return ["".join(x).rstrip() for x in lines]


def test_terminal_shows_one_live_bar_and_log_lines_on_their_own(readme_quickstart: QuickstartRun) -> None:
    """README's quickstart in a terminal: log lines print above a live bar, never glued to it."""
    run = readme_quickstart
    assert run.returncode == 0, run.output[-3000:]
    shown = screen(run.output)
    logs = [x for x in shown if LOG_LINE.search(x)]
    bars = [x for x in shown if BAR.search(x)]
    assert len(logs) >= 10, shown  # step lines, eval, samples, checkpoint saves
    for line in logs:  # every log line starts at column 0 and no bar is glued to it
        assert LOG_LINE.match(line) and "%|" not in line, line
    # the bar was live (it redrew between log lines) but only its final state stays on screen
    assert len(re.findall(r"\rtrain: +\d+%\|", run.output)) > 10
    assert len(bars) == 1 and "120/120" in bars[0], bars
    assert shown.index(bars[0]) > max(shown.index(x) for x in logs)  # below the last log line
    # extras in a fixed order: loss, tok/s, lr; no second ETA next to tqdm's own
    assert re.search(r"loss=\d+\.\d{3}, tok/s=[\d,]+, lr=\d\.\de-\d\d\]$", bars[0]), bars[0]
    assert "eta_h" not in run.output


# ----------------------------------------------------------------------------------------- throughput
@pytest.fixture(scope="module")
def slow_eval_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Defaults, but every evaluation is long (all the embedded val batches, 40 HellaSwag examples, long samples)
    next to 1-step logging intervals; output through pipes (not a terminal), as in CI or `> log`."""
    out = tmp_path_factory.mktemp("slow_eval") / "run"
    proc = run_cli("train", "--preset", "quickstart", "--output_dir", str(out), "--max_steps", "12",
                   "--logging_steps", "1", "--eval_steps", "4", "--checkpoint_steps", "4", "--val_batches", "19",
                   "--hellaswag_path", str(shared_data / "hellaswag_val.jsonl"), "--hellaswag_limit", "20",
                   "--sample_max_new_tokens", "32", check=True)
    return out, proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_eval_and_save_time_stay_out_of_tokens_per_second(slow_eval_run) -> None:
    out, _ = slow_eval_run
    rows = _rows(out)
    train = {r["step"]: r for r in rows if "perf/tokens_per_sec" in r}
    eval_s = {r["step"]: r["time/eval_seconds"] for r in rows if "time/eval_seconds" in r}
    ckpt_s = {r["step"]: r["time/checkpoint_seconds"] for r in rows if "time/checkpoint_seconds" in r}
    assert sorted(eval_s) == [4, 8, 12] and sorted(ckpt_s) == [4, 8, 12]
    after_eval = [s + 1 for s in (4, 8)]  # the intervals that would contain an evaluation and a save
    others = [train[s]["perf/tokens_per_sec"] for s in train if s not in after_eval and s > 1]  # 1: warm-up
    step_s = statistics.median(train[s]["perf/step_time_ms"] / 1000 for s in train if s > 1)
    for s in after_eval:
        # the evaluation really took several training steps' time, so counting it would cut tokens/s to < 1/3...
        assert eval_s[s - 1] > 3 * step_s, (eval_s, step_s)
        # ...yet the interval after it reads like any other (compared with the same run: no absolute bound)
        assert train[s]["perf/tokens_per_sec"] > 0.5 * statistics.median(others), (s, train[s], others)


def test_metrics_lines_carry_cumulative_tokens(slow_eval_run) -> None:
    out, _ = slow_eval_run
    for r in _rows(out):
        assert r["tokens"] == r["step"] * 1024, r  # the quickstart's 1,024 tokens per step


def test_output_without_a_terminal_is_plain_log_lines(slow_eval_run) -> None:
    out, proc = slow_eval_run
    assert "%|" not in proc.stdout + proc.stderr and "step/s" not in proc.stdout + proc.stderr
    assert len([x for x in proc.stdout.splitlines() if LOG_LINE.match(x) and "| loss " in x]) == 12
    assert (out / "train.log").read_text().splitlines() == [x for x in proc.stdout.splitlines() if LOG_LINE.match(x)]


# ----------------------------------------------------------------------------------------- unit level
def test_samples_render_as_one_markdown_block_each_in_tensorboard() -> None:
    from tensorboard import plugin_util

    from hf_gpt2_train.tracking import samples_markdown

    prompts = ["Hello, I'm a language model,", "The meaning of life is", "`code` *x*"]
    tricky = ["+ a list item\n>>> nested quote\n# heading\n\n    indented", "```\nfence inside\n```\n<b>html</b>",
              "plain words"]
    samples = [f"{p} -> {c}" for p, c in zip(prompts, tricky, strict=True)]
    html = plugin_util.markdown_to_safe_html(samples_markdown(samples, prompts))
    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", html, flags=re.S)
    import html as html_lib

    assert [html_lib.unescape(b).rstrip("\n") for b in blocks] == tricky
    outside = re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    for tag in ("<ul", "<ol", "<blockquote", "<h1", "<b>"):
        assert tag not in outside, (tag, html)
    for p in prompts:  # each prompt shown verbatim, set apart from its continuation
        assert f"<code>{html_lib.escape(p, quote=False)}</code>" in outside.replace("<code> ", "<code>").replace(
            " </code>", "</code>"), html


def test_step_timer_excludes_paused_time() -> None:
    from hf_gpt2_train.tracking import StepTimer

    timer = StepTimer(0)
    time.sleep(0.05)
    with timer.paused("eval"):
        time.sleep(0.3)
    dt, n = timer.lap(1)
    assert n == 1 and 0.04 < dt < 0.25 and timer.last["eval"] >= 0.3
    assert timer.overhead_per_step(1) == pytest.approx(timer.last["eval"])


def test_schedule_change_names_every_changed_key() -> None:
    from hf_gpt2_train.config import build_config
    from hf_gpt2_train.optim import schedule_change

    old = build_config("quickstart")
    assert schedule_change(old.to_dict(), old, 80) is None
    new = build_config("quickstart", cli={"max_steps": 200, "warmup_steps": 20, "min_lr_ratio": 0.2})
    change = schedule_change(old.to_dict(), new, 80)
    msg = change.message
    assert change.warning  # a cosine run's lr changes: a warning
    assert "max_steps 120 -> 200" in msg and "warmup_steps 10 -> 20" in msg and "min_lr_ratio 0.1 -> 0.2" in msg
    # by hand: old 4e-4 + 0.5 (1 + cos(pi 70/110)) 3.6e-3 = 1.45e-3; new 8e-4 + 0.5 (1 + cos(pi/3)) 3.2e-3 = 3.2e-3
    assert "the schedule now ends at step 200 (was 120)" in msg
    assert "lr at step 80 becomes 3.20e-03 (was 1.45e-03)" in msg, msg
    assert "\n" not in msg


def test_checkpoints_list_marks_a_val_loss_measured_at_another_step() -> None:
    from hf_gpt2_train.checkpoint.cli import val_loss_cell

    assert val_loss_cell({"step": 80, "val_loss": 4.25, "val_loss_step": 80}) == "4.2500"
    assert val_loss_cell({"step": 117, "val_loss": 4.25, "val_loss_step": 80}) == "4.2500 (step 80)"
    assert val_loss_cell({"step": 117, "val_loss": None, "val_loss_step": None}) == "-"
    assert val_loss_cell({"step": 117, "val_loss": 4.25}) == "4.2500 (step ?)"  # manifests from before the field


def test_precision_names_say_what_runs() -> None:
    from hf_gpt2_train.precision import precision_name

    assert [precision_name(p) for p in ("no", "fp32", "fp16", "bf16")] == ["fp32", "fp32", "fp16", "bf16"]
    assert precision_name("fp8-te", 0.893) == "fp8 (te, coverage 89%)"
    assert precision_name("fp8-ao", 0.42) == "fp8 (ao, coverage 42%)"
    assert precision_name("fp8-ao-emulated", 1.0) == "fp8 (ao emulated, coverage 100%)"


def test_loss_plot_smooths_without_lag_and_does_not_let_the_first_steps_squeeze_the_axis(tmp_path: Path) -> None:
    import math
    import random

    from hf_gpt2_train.hub.card import RunRecord
    from hf_gpt2_train.hub.loss_plot import ema, plot_loss_curve, smooth, y_limits

    rng = random.Random(0)
    steps = list(range(10, 5001, 10))
    true = [3.2 + 7.6 * math.exp(-s / 150) for s in steps]
    raw = [t + rng.gauss(0, 0.1) for t in true]
    smoothed = smooth(raw)
    err = [abs(a - b) for a, b in zip(smoothed, true, strict=True)]
    lag = [abs(a - b) for a, b in zip(ema(raw, 0.9), true, strict=True)]  # a one-way EMA of the same window
    assert max(err[25:]) < 0.3 * max(lag[25:]) and sum(err) < 0.5 * sum(lag)  # no lag where the loss falls fast
    assert max(err[100:]) < 0.05  # and close to the true curve once it flattens (noise sd 0.1)
    assert smooth(raw[:12]) == raw[:12]  # a dozen points: nothing to smooth
    bottom, top, clipped = y_limits(smoothed, [], raw)
    assert clipped and top < 5.0 and bottom < min(raw[50:])  # ~10.8 at init is off the top, the rest fills it
    rows = [{"step": s, "train/loss": v} for s, v in zip(steps, raw, strict=True)]
    rows[100]["event"] = "resume"
    rec = RunRecord(checkpoint=tmp_path / "final", run_dir=None, step=5000, tokens_seen=None,
                    config={"preset": "gpt2"}, metrics=rows)
    assert plot_loss_curve(rec, tmp_path / "curve.png") and (tmp_path / "curve.png").stat().st_size > 10_000
