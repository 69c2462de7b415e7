"""The one line for a lost peer (resilience/peers.py): what the backends raise when another process is gone."""

from __future__ import annotations

import pytest

from hf_gpt2_train.resilience.peers import lost_peer_message


def test_gloo_peer_loss_becomes_one_line_naming_the_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                       "peer [192.0.2.2]:54437. This is typically caused by a remote worker crashing. Check the logs.")
    msg = lost_peer_message(err)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("lost contact with another process of this run (Connection closed by peer [192.0.2.2]:54437)")
    assert "--max_restarts" in msg and "join_timeout" in msg


def test_other_errors_and_single_process_runs_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer_message(RuntimeError("CUDA out of memory")) is None
    assert lost_peer_message(ValueError("Connection closed by peer")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_peer_message(RuntimeError("Connection closed by peer [x]")) is None
