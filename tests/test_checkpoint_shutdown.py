"""GracefulShutdown's signal handling in this process, and the resume command it prints."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from hf_gpt2_train.checkpoint import GracefulShutdown, resume_command_hint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_first_signal_requests_a_stop_and_handlers_are_restored(sig: signal.Signals,
                                                                capfd: pytest.CaptureFixture) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with GracefulShutdown() as g:
        assert not g.should_stop()
        os.kill(os.getpid(), sig)
        assert g.requested and g.signal_name == sig.name and g.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM (schedulers send several) changes nothing
        assert g.should_stop()
    assert {s: signal.getsignal(s) for s in before} == before
    err = capfd.readouterr().err
    assert f"{sig.name} received: finishing the current step, saving 'latest'" in err


def test_resume_command_single_process(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND",
              "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/hf_gpt2_train/__main__.py", "train", "--preset", "quickstart",
                                      "--output_dir", "my run", "--resume", "auto", "--max_steps", "9"])
    assert resume_command_hint("my run") == ("python -m hf_gpt2_train train --preset quickstart --output_dir "
                                             "'my run' --max_steps 9 --resume_from_checkpoint latest")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hf-gpt2-train", "train", "--resume_from_checkpoint=best"])
    assert resume_command_hint(tmp_path) == (f"hf-gpt2-train train --output_dir {tmp_path} "
                                             "--resume_from_checkpoint latest")


def test_resume_command_under_torchrun_and_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/x/hf_gpt2_train/__main__.py", "train", "--config", "c.yaml"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert resume_command_hint("o") == ("ACCELERATE_USE_CPU=1 torchrun --nnodes 2 --nproc_per_node 4 -m "
                                        "hf_gpt2_train train --config c.yaml --output_dir o --resume_from_checkpoint latest")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert resume_command_hint("o") == ("accelerate launch --num_processes 8 -m hf_gpt2_train train --config "
                                        "c.yaml --output_dir o --resume_from_checkpoint latest")
