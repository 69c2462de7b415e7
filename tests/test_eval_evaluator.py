"""The trainer's Evaluator: cadence, what one evaluation returns, and HellaSwag without network."""

from __future__ import annotations

import logging
import socket

import pytest
import tiktoken
import torch
from accelerate import Accelerator

from hf_gpt2_train.config import ConfigError, build_config
from hf_gpt2_train.evaluate import Evaluator, hellaswag_eval
from hf_gpt2_train.model import build_model


def _cfg(**cli):
    return build_config("quickstart", cli={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64,
                                           "sample_max_new_tokens": 4, **cli})


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hellaswag_val.jsonl"


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 2, 33), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def test_due_every_eval_steps_and_at_the_end(shared_data) -> None:
    cfg = _cfg(eval_steps=100, hellaswag=False)
    ev = Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), [], tiktoken.get_encoding("gpt2"))
    assert [s for s in range(1, 301) if ev.due(s)] == [100, 200, 300]
    assert ev.due(37, final=True) and not ev.due(37)
    cfg.eval.eval_steps = 0  # only at the end
    assert not any(ev.due(s) for s in range(1, 301)) and ev.due(300, final=True)


def test_run_returns_metrics_and_samples(shared_data) -> None:
    cfg = _cfg(hellaswag_path=str(shared_data / "hellaswag_val.jsonl"), hellaswag_limit=8)
    model = build_model(cfg.model, seed=0)
    model.train()
    ev = Evaluator(cfg, Accelerator(cpu=True), model, _batches(), tiktoken.get_encoding("gpt2"))
    metrics, samples = ev.run(step=100)
    assert set(metrics) == {"eval/val_loss", "eval/hellaswag_acc", "eval/hellaswag_acc_norm"}
    assert 9.0 < metrics["eval/val_loss"] < 12.0
    hs = hellaswag_eval(model, ev.hellaswag, ev.enc, ev.accelerator, 50257, limit=8)
    assert (metrics["eval/hellaswag_acc"], metrics["eval/hellaswag_acc_norm"]) == (hs["acc"], hs["acc_norm"])
    assert [s.split(" -> ")[0] for s in samples] == cfg.eval.sample_prompts
    assert model.training
    assert ev.run(step=200) == (metrics, samples)  # same batches, same seed: comparable across evaluations


def test_no_network_skips_hellaswag_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("HF_GPT2_TRAIN_HELLASWAG_URL", _closed_port_url())
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path))
    cfg = _cfg()
    # listen on the evaluator's own logger: the trainer's logging setup stops propagation to the root
    log = logging.getLogger("hf_gpt2_train.evaluate.evaluator")
    log.addHandler(caplog.handler)
    try:
        ev = Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), _batches(),
                       tiktoken.get_encoding("gpt2"))
    finally:
        log.removeHandler(caplog.handler)
    assert any("HellaSwag is skipped" in r.getMessage() and "--hellaswag_path" in r.getMessage()
               for r in caplog.records)
    metrics, _ = ev.run(step=1)
    assert set(metrics) == {"eval/val_loss"}


def test_missing_explicit_path_is_bad_input(tmp_path) -> None:
    cfg = _cfg(hellaswag_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="--hellaswag_path"):
        Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), [], tiktoken.get_encoding("gpt2"))
