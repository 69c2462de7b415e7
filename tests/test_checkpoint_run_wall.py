"""benchmarks/checkpoint_run_wall.py on a tiny model: three real training runs (final save only, synchronous
saves, asynchronous saves), their figures and the saves each run's log reports. Timings are figures, not
asserted (2 shared cores); their consistency and the saves the runs made are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sync_vs_async_whole_run_comparison_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "wall.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checkpoint_run_wall.py"), "--repeats", "1",
                           "--save_every", "2", "--dir", str(tmp_path / "runs"), "--output", str(out), "--",
                           "--preset", "quickstart", "--max_steps", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"][-4:] == ["--preset", "quickstart", "--max_steps", "4"]
    runs = res["runs"]
    assert set(runs) == {"final_only", "sync", "async"} and all(len(v) == 1 for v in runs.values())
    assert [s["step"] for s in runs["final_only"][0]["saves"]] == [4]
    assert [s["step"] for s in runs["sync"][0]["saves"]] == [2, 4]
    assert all(s["paused_s"] is None for s in runs["sync"][0]["saves"])  # synchronous: no background line
    background = runs["async"][0]["saves"][0]  # step 2 in the background; the final save (step 4) is durable
    assert background["step"] == 2 and background["paused_s"] is not None
    assert runs["async"][0]["saves"][-1]["step"] == 4 and runs["async"][0]["saves"][-1]["paused_s"] is None
    med = res["median_wall_s"]
    assert med == {m: v[0]["wall_s"] for m, v in runs.items()} and all(t > 0 for t in med.values())
    assert res["sync_cost_s"] == pytest.approx(med["sync"] - med["final_only"])
    assert res["async_cost_s"] == pytest.approx(med["async"] - med["final_only"])
    if res["sync_cost_s"] > 0:
        assert res["async_vs_sync_cost"] == pytest.approx(res["async_cost_s"] / res["sync_cost_s"])
    assert f"async +{res['async_cost_s']:.1f}s" in proc.stdout
    assert not list((tmp_path / "runs").iterdir())  # the runs were removed
