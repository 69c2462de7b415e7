"""benchmarks/step_interference.py on the quickstart model: the four modes are measured in one run and the
processes it starts on the other core are gone afterwards. Step times are figures, not asserted (2 shared cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def test_one_thread_step_beside_each_kind_of_work_on_the_other_core(tmp_path: Path) -> None:
    out = tmp_path / "interference.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_interference.py"), "--preset", "quickstart",
                           "--steps", "3", "--save_every", "1", "--repeats", "1", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["step_s"]) == ["alone", "cpu_spin", "memory_stream", "save_in_flight"]
    assert all(len(res["step_s"][m]) == 3 for m in ("alone", "cpu_spin", "memory_stream"))
    assert len(res["step_s"]["save_in_flight"]) <= 3  # only the steps that began while a write was in flight
    assert res["vs_alone"]["alone"] == 1.0 and res["train_threads"] == 1
    assert all(v > 0 for m, v in res["median_step_s"].items() if v is not None)
    assert "one training thread, the other core" in proc.stdout
    left = [p for p in psutil.process_iter(["cmdline"]) if any("np.copyto" in a or "0xFFFF" in a
                                                               for a in (p.info["cmdline"] or []))]
    assert not left, left  # the interfering processes were stopped
