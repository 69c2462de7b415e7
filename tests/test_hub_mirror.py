"""Mirroring a run to the Hub while it trains (``--push_to_hub --hub_strategy``) and ``--resume_from_checkpoint
hub``, against the loopback Hub stand-in of tests/test_hub_push.py (the only thing stood in).

Two real CLI runs of the small configuration of tests/test_checkpoint_e2e.py (8 steps, a save every 2 steps):
the first mirrors to a stand-in that answers every request slowly; the second starts in a new, empty output
dir from the repository as it was after the first run's first upload (as if its machine had died then),
while the stand-in refuses the first uploads (the Hub is down).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_gpt2_train.checkpoint import atomic
from tests.test_checkpoint_e2e import losses, manifest, train_args
from tests.test_hub_push import EXPORT_FILES, TOKEN, FakeHub, _clean_env, hub_env, start_fake_hub

REPO_ID = "dora/mirrored-run"
DELAY_S = 1.5  # every answer of the slow stand-in takes this long; one upload makes at least 2 requests


def train(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_gpt2_train", *args], capture_output=True, text=True,
                          env=_clean_env(env), timeout=900)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FakeHub, subprocess.CompletedProcess]:
    hub, _server = start_fake_hub()  # a daemon thread: serves until the session ends
    hub.delay_s = DELAY_S
    out = tmp_path_factory.mktemp("mirror") / "run"
    env = hub_env(hub.url, tmp_path_factory.mktemp("hf_home"), token=TOKEN)
    proc = train(train_args(out, push_to_hub="true", hub_model_id=REPO_ID, hub_strategy="checkpoint"), env)
    return out, hub, proc


def step_gaps(out: Path) -> list[float]:
    """Wall seconds between consecutive optimizer steps (time/elapsed_hours, logged at every step)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"time/elapsed_hours"' in x]
    t = [3600 * r["time/elapsed_hours"] for r in rows]
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def test_slow_hub_never_slows_training_and_the_repo_ends_with_checkpoint_and_export(mirrored, tmp_path) -> None:
    out, hub, proc = mirrored
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log and "hub: could not push" not in log
    # Uploads ran while training went on: a save that waited for one would add >= 2 slow answers to a step.
    gaps = step_gaps(out)
    assert len(gaps) == 7 and max(gaps) < 2 * DELAY_S, gaps
    first = hub.commits[0]
    assert first[1] == "Training in progress, step 2, checkpoint"
    assert EXPORT_FILES <= set(first[2]) and "last-checkpoint/optimizer.bin" in first[2]
    files = hub.files[REPO_ID]
    # The repo ends with the final export at the root (pushed after training) and the final checkpoint.
    export_dir = out / "hf_export" / "final"
    assert {n: files[n] for n in EXPORT_FILES} == {p.name: p.read_bytes() for p in export_dir.iterdir()}
    ckpt = {k.removeprefix("last-checkpoint/"): v for k, v in files.items() if k.startswith("last-checkpoint/")}
    local = out / "checkpoints" / "final"
    assert set(ckpt) == {p.name for p in local.iterdir()}
    assert all(ckpt[n] == (local / n).read_bytes() for n in ckpt if n != "manifest.json")
    downloaded = tmp_path / "last-checkpoint"
    downloaded.mkdir()
    for name, data in ckpt.items():
        (downloaded / name).write_bytes(data)
    v = atomic.verify(downloaded, hashes=True)
    assert v.ok and v.manifest["step"] == 8 and "final" in v.manifest["tiers"], v.reason
    # Nothing local or secret left the machine: no path of this machine, no token, in any uploaded byte.
    for name, data in files.items():
        assert str(out.parent).encode() not in data and TOKEN.encode() not in data, name
    assert all(auth == f"Bearer {TOKEN}" for m, _, auth in hub.requests if m == "POST")
    assert not hub.unexpected


def test_resume_from_hub_in_a_new_dir_continues_the_same_losses_and_a_down_hub_only_warns(mirrored,
                                                                                        tmp_path) -> None:
    out, hub, first_run = mirrored
    assert first_run.returncode == 0
    hub.files[REPO_ID] = dict(hub.history[0])  # the repository as the first upload (step 2) left it
    hub.delay_s = 0.0
    refused: list[str] = []

    def down(method: str) -> bool:  # the Hub refuses the first two uploads, then comes back
        if method == "POST" and len(refused) < 2:
            refused.append(method)
            return True
        return False

    hub.down = down
    new = tmp_path / "fresh-machine"
    env = hub_env(hub.url, tmp_path / "hf_home", token=TOKEN)
    proc = train(train_args(new, resume_from_checkpoint="hub", hub_model_id=REPO_ID, push_to_hub="true"), env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]  # default --hub_strategy every_save
    assert re.search(rf"resumed from {re.escape(str(new / 'checkpoints' / 'step_0000002'))} \(step 2", log), log
    assert losses(new) == {s: v for s, v in losses(out).items() if s > 2}  # bit for bit, steps 3-8
    assert len(refused) == 2 and "hub: could not push step" in log and "Traceback" not in log
    assert atomic.verify(new / "checkpoints" / "step_0000002").ok  # the downloaded checkpoint is kept
    assert manifest(new / "checkpoints" / "final")["step"] == 8
    assert hub.files[REPO_ID]["model.safetensors"] == (new / "hf_export" / "final" / "model.safetensors").read_bytes()


def test_mirror_with_the_hub_unreachable_warns_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No server at all: queuing returns at once, the upload fails with a warning, finish() returns."""
    import huggingface_hub.constants as hub_constants

    from hf_gpt2_train.config import Config
    from hf_gpt2_train.hub.mirror import HubMirror
    from tests.test_checkpoint_manager import Harness

    h = Harness(tmp_path / "run", checkpoint_steps=1)
    h.step(final=True)
    cfg = Config()
    cfg.hub.push_to_hub, cfg.hub.hub_model_id, cfg.hub.hub_strategy, cfg.hub.hub_token = True, "x/y", "checkpoint", TOKEN
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", dead)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # conftest runs the suite offline
    mirror = HubMirror(cfg, tmp_path / "run")
    final = tmp_path / "run" / "checkpoints" / "final"
    with caplog.at_level(logging.WARNING, logger="hf_gpt2_train"):
        mirror.saved(final, atomic.read_manifest(final))
        mirror.finish()
    assert "hub: could not push step 1 to x/y" in caplog.text and mirror.pushed == []
    assert not any((tmp_path / "run" / ".hub-mirror").iterdir())  # the staged hard links are gone


def test_bad_hub_requests_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    from hf_gpt2_train.config import ConfigError, build_config
    from hf_gpt2_train.hub.mirror import HubMirror

    with pytest.raises(ConfigError, match="--resume_from_checkpoint hub needs --hub_model_id USER/NAME"):
        build_config(cli={"resume_from_checkpoint": "hub"}).validate()
    with pytest.raises(ConfigError, match="hub_strategy must be end/every_save/checkpoint/all_checkpoints"):
        build_config(cli={"hub_strategy": "sometimes"}).validate()
    hub, server = start_fake_hub()
    try:
        hub.repos["erin/empty"], hub.files["erin/empty"] = {}, {"README.md": b"an export, no checkpoint"}
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # conftest runs the suite offline
        cfg = build_config(cli={"resume_from_checkpoint": "hub", "hub_model_id": "erin/empty", "hub_token": TOKEN})
        with pytest.raises(ConfigError, match="erin/empty holds no last-checkpoint/ .*--hub_strategy checkpoint"):
            HubMirror(cfg, tmp_path / "run").download(tmp_path / "run" / "checkpoints")
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
