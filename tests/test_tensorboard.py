"""TensorBoard: a real quickstart run (and its resume) read back by TensorBoard's own reader and server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as PluginEventAccumulator,
)
from tensorboard.plugin_util import markdown_to_safe_html

from tests.conftest import REPO, run_cli

SCALARS = ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_ms", "perf/mfu",
           "eval/val_loss", "eval/hellaswag_acc", "eval/hellaswag_acc_norm", "time/elapsed_hours",
           "time/eta_hours"]
SAMPLES_TAG = "eval/samples/text_summary"


@dataclass
class Run:
    output_dir: Path
    tb_dir: Path  # OUTPUT_DIR/runs/<run_name>
    metrics: list[dict]
    resume_stdout: str  # the console of the resumed run


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Run:
    """Train 6 steps (checkpoint every 2), then resume from step 4 for 4 more (to 8).

    The first run logged steps 5 and 6 that the resumed run logs again: TensorBoard must show each once.
    """
    out = tmp_path_factory.mktemp("tb") / "tbrun"
    common = ["--preset", "quickstart", "--output_dir", str(out), "--total_batch_size", "1024",
              "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "3",
              "--checkpoint_steps", "2", "--val_batches", "2", "--hellaswag_path",
              str(shared_data / "hellaswag_val.jsonl"), "--hellaswag_limit", "8", "--sample_max_new_tokens", "6",
              "--device_peak_tflops", "1", "--report_to", "tensorboard"]
    run_cli("train", *common, "--max_steps", "6", check=True)
    resumed = run_cli("train", *common, "--max_steps", "8", "--resume_from_checkpoint",
                      str(out / "checkpoints" / "step_0000004"), check=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(out, out / "runs" / "tbrun", metrics, resumed.stdout)


def _accumulator(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _metric(run: Run, tag: str) -> dict[int, float]:
    return {m["step"]: m[tag] for m in run.metrics if tag in m}


def test_event_files_hold_every_scalar_and_samples(resumed_run: Run) -> None:
    acc = _accumulator(resumed_run.tb_dir)
    tags = acc.Tags()
    missing = [t for t in SCALARS if t not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {tags['scalars']}"
    # each scalar in TensorBoard equals what metrics.jsonl says for that step (float32 in event files)
    for tag in SCALARS:
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        assert tb.keys() == _metric(resumed_run, tag).keys(), tag
        for step, value in _metric(resumed_run, tag).items():
            assert tb[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (tag, step)
    assert sorted(_metric(resumed_run, "train/loss")) == list(range(1, 9))
    assert sorted(_metric(resumed_run, "eval/val_loss")) == [3, 6, 8]  # every eval_steps and at the end
    losses = _metric(resumed_run, "train/loss")
    assert losses[8] < losses[1]  # it trains
    assert all(0.0 <= v <= 1.0 for v in _metric(resumed_run, "eval/hellaswag_acc_norm").values())
    assert all(0.0 < v < 1.0 for v in _metric(resumed_run, "perf/mfu").values())
    # generated samples as text at each evaluation
    assert SAMPLES_TAG in tags["tensors"]  # torch's SummaryWriter.add_text appends /text_summary
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(SAMPLES_TAG)}
    assert sorted(samples) == [3, 6, 8]
    for text in samples.values():  # as TensorBoard's Text tab renders it: one code block per sample
        html = markdown_to_safe_html(text)
        assert html.count("<pre>") == 2 and "<ul>" not in html and "<blockquote>" not in html, html
        assert "<code>Hello, I'm a language model,</code>" in html and "<code>The meaning of life is</code>" in html


def test_resume_leaves_no_duplicate_steps(resumed_run: Run) -> None:
    # raw files: the first run really wrote steps 5 and 6, and the resumed run wrote them again...
    raw: Counter[int] = Counter()
    files = sorted(resumed_run.tb_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2
    for f in files:
        for ev in EventFileLoader(str(f)).Load():
            if any(v.tag == "train/loss" for v in ev.summary.value):
                raw[ev.step] += 1
    assert raw[5] == 2 and raw[6] == 2 and raw[4] == 1
    # ...and TensorBoard's readers show each step once, the resumed run's value (purge_step). The legacy
    # EventAccumulator (scalars) and the one the TensorBoard server uses (plugin_event_accumulator, which
    # also holds the sample text) purge differently: check both.
    acc = _accumulator(resumed_run.tb_dir)
    plugin_acc = PluginEventAccumulator(str(resumed_run.tb_dir), size_guidance={"tensors": 0})
    plugin_acc.Reload()
    losses = _metric(resumed_run, "train/loss")
    for tag in ("train/loss", "eval/val_loss", "perf/tokens_per_sec"):
        expected = sorted(_metric(resumed_run, tag))
        assert [e.step for e in acc.Scalars(tag)] == expected, tag
        assert [e.step for e in plugin_acc.Tensors(tag)] == expected, tag
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([losses[k] for k in range(1, 9)])
    assert [e.step for e in plugin_acc.Tensors(SAMPLES_TAG)] == [3, 6, 8]


def test_one_run_folder_per_run_name_whatever_the_resumes(resumed_run: Run) -> None:
    """A fresh run and a resume write into runs/tbrun only (no timestamp-named hparams sub-runs), and the
    HParams tab entry lives in that run, written once."""
    runs = resumed_run.output_dir / "runs"
    with_events = sorted({p.parent.relative_to(runs).as_posix() for p in runs.rglob("events.out.tfevents.*")})
    assert with_events == ["tbrun"], with_events
    assert [p.name for p in runs.iterdir()] == ["tbrun"]
    assert not [p for p in resumed_run.tb_dir.iterdir() if p.is_dir()]  # Accelerate's add_hparams would add one
    plugin_acc = PluginEventAccumulator(str(resumed_run.tb_dir))
    plugin_acc.Reload()
    hparams = plugin_acc.PluginTagToContent("hparams")
    assert sorted(hparams) == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim/max_steps"].number_value == 6  # the fresh run's, not re-written by the resume
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"eval/val_loss", "eval/hellaswag_acc_norm"}
    raw = Counter()
    for f in resumed_run.tb_dir.glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            raw.update(v.tag for v in ev.summary.value if v.tag.startswith("_hparams_"))
    assert set(raw.values()) == {1}, raw  # once, though the run started twice


def test_metrics_jsonl_marks_the_resume_for_the_loss_plot(resumed_run: Run) -> None:
    from hf_gpt2_train.hub.card import read_metrics
    from hf_gpt2_train.hub.loss_plot import resume_steps

    assert resume_steps(read_metrics(resumed_run.output_dir / "metrics.jsonl")) == [4]
    assert all(m["tokens"] == m["step"] * 1024 for m in resumed_run.metrics)


def test_resume_that_changes_the_schedule_warns_once(resumed_run: Run) -> None:
    lines = [x for x in resumed_run.resume_stdout.splitlines() if "changed LR schedule" in x]
    assert len(lines) == 1, resumed_run.resume_stdout
    assert " WARNING " in lines[0] and "max_steps 6 -> 8" in lines[0] and "ends at step 8 (was 6)" in lines[0]
    assert "lr at step 4 becomes" in lines[0]


def test_checkpoints_list_shows_each_checkpoints_own_val_loss(resumed_run: Run) -> None:
    """Evaluations at 3, 6, 8; saves at 2, 4, 6, 8: step_0000004 carries the val loss of step 3, marked so
    (a checkpoint saved before any evaluation shows '-': tests/test_tracking.py)."""
    val = _metric(resumed_run, "eval/val_loss")
    rows = {r["tier"]: r for r in json.loads(run_cli("checkpoints", "list", str(resumed_run.output_dir), "--json",
                                                     check=True).stdout)}
    assert rows["step_0000004"]["val_loss_step"] == 3 and rows["step_0000006"]["val_loss_step"] == 6
    table = run_cli("checkpoints", "list", str(resumed_run.output_dir), check=True).stdout
    line = {x.split()[0]: x for x in table.splitlines() if x.strip()}
    assert f"{val[8]:.4f}" in line["final"] and "(step" not in line["final"]
    assert f"{val[3]:.4f} (step 3)" in line["step_0000004"]


# ------------------------------------------------------------------------------------------ HTTP server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


def _serve_and_check(cmd: list[str], port: int, run: Run, env: dict | None = None) -> str:
    """Start TensorBoard (in its own process group), wait for the scalars API, compare, always kill it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tbrun&tag=train/loss"
    try:
        deadline, data = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"TensorBoard exited: {proc.stdout.read() if proc.stdout else ''}"
            try:
                data = _get_json(url)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)  # not listening, or the run not loaded yet
        assert data is not None, "TensorBoard did not serve the scalars within 120 s"
        runs = _get_json(f"http://127.0.0.1:{port}/data/runs")
        assert "tbrun" in runs
        # [[wall_time, step, value], ...]: the run's losses, each step once
        expected = _metric(run, "train/loss")
        assert [int(step) for _, step, _ in data] == sorted(expected)
        for _, step, value in data:
            assert value == pytest.approx(expected[int(step)], rel=1e-6)
        val = _get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tbrun&tag=eval/val_loss")
        assert [int(s) for _, s, _ in val] == [3, 6, 8]
        text = _get_json(f"http://127.0.0.1:{port}/data/plugin/text/text?run=tbrun&tag={SAMPLES_TAG}")
        assert [t["step"] for t in text] == [3, 6, 8]
        assert all(t["text"].count("<pre>") == 2 and "<code>The meaning of life is</code>" in t["text"]
                   for t in text)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    return out


def test_tensorboard_server_serves_the_scalars(resumed_run: Run) -> None:
    port = _free_port()
    _serve_and_check([sys.executable, "-m", "tensorboard.main", "--logdir", str(resumed_run.output_dir / "runs"),
                      "--host", "127.0.0.1", "--port", str(port)], port, resumed_run)


def test_start_tensorboard_script(resumed_run: Run) -> None:
    port = _free_port()
    # an OUTPUT_DIR is accepted in place of its runs/ folder
    out = _serve_and_check(["bash", str(REPO / "scripts" / "start_tensorboard.sh"), "--logdir",
                            str(resumed_run.output_dir), "--host", "127.0.0.1", "--port", str(port)],
                           port, resumed_run, env={"PYTHON": sys.executable})
    assert f"http://127.0.0.1:{port}/" in out
    assert f"ssh -N -L {port}:localhost:{port} " in out


def test_start_tensorboard_script_bad_input(tmp_path: Path) -> None:
    script = ["bash", str(REPO / "scripts" / "start_tensorboard.sh")]
    for args, fix in (([" --port", "x"], "unknown option"), (["--port", "99999"], "--port must be"),
                      (["--logdir", str(tmp_path / "nope")], "--logdir")):
        p = subprocess.run([*script, *args], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHON": sys.executable})
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and fix in p.stderr, p.stderr
