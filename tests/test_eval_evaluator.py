"""The trainer's Evaluator: cadence, what one evaluation returns, and HellaSwag without network."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
from accelerate import Accelerator

from hf_gpt2_train.config import ConfigError, build_config
from hf_gpt2_train.data.tokenizer import get_encoding
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
    ev = Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), [], get_encoding())
    assert [s for s in range(1, 301) if ev.due(s)] == [100, 200, 300]
    assert ev.due(37, final=True) and not ev.due(37)
    cfg.eval.eval_steps = 0  # only at the end
    assert not any(ev.due(s) for s in range(1, 301)) and ev.due(300, final=True)


def test_run_returns_metrics_and_samples(shared_data) -> None:
    cfg = _cfg(hellaswag_path=str(shared_data / "hellaswag_val.jsonl"), hellaswag_limit=8)
    model = build_model(cfg.model, seed=0)
    model.train()
    ev = Evaluator(cfg, Accelerator(cpu=True), model, _batches(), get_encoding())
    metrics, samples = ev.run(step=100)
    assert set(metrics) == {"eval/val_loss", "eval/hellaswag_acc", "eval/hellaswag_acc_norm"}
    assert 9.0 < metrics["eval/val_loss"] < 12.0
    hs = hellaswag_eval(model, ev.hellaswag, ev.enc, ev.accelerator, 50257, limit=8)
    assert (metrics["eval/hellaswag_acc"], metrics["eval/hellaswag_acc_norm"]) == (hs["acc"], hs["acc_norm"])
    assert [s.split(" -> ")[0] for s in samples] == cfg.eval.sample_prompts
    assert model.training
    assert ev.run(step=200) == (metrics, samples)  # same batches, same seed: comparable across evaluations


def test_quickstart_has_hellaswag_off_with_one_info_line_until_a_path_is_given(shared_data, caplog) -> None:
    """The quickstart runs offline: HellaSwag (a download) is off, and one INFO line says how to turn it on."""
    cfg = _cfg()
    assert cfg.eval.hellaswag is False
    log = logging.getLogger("hf_gpt2_train.evaluate.evaluator")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="hf_gpt2_train.evaluate.evaluator")
    try:
        ev = Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), [], get_encoding())
    finally:
        log.removeHandler(caplog.handler)
    assert ev.hellaswag == []
    # one record (caplog may see it twice: through our handler and through the root logger's)
    lines = list({id(r): r for r in caplog.records if "HellaSwag" in r.getMessage()}.values())
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "--hellaswag_path" in lines[0].getMessage()
    # giving a file turns it on; an explicit --hellaswag false still wins
    assert _cfg(hellaswag_path=str(shared_data / "hellaswag_val.jsonl")).eval.hellaswag is True
    assert _cfg(hellaswag_path=str(shared_data / "hellaswag_val.jsonl"), hellaswag="false").eval.hellaswag is False


def test_no_network_skips_hellaswag_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("HF_GPT2_TRAIN_HELLASWAG_URL", _closed_port_url())
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path))
    cfg = _cfg(hellaswag=True)  # asked for, but no file and no network
    # listen on the evaluator's own logger: the trainer's logging setup stops propagation to the root
    log = logging.getLogger("hf_gpt2_train.evaluate.evaluator")
    log.addHandler(caplog.handler)
    try:
        ev = Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), _batches(),
                       get_encoding())
    finally:
        log.removeHandler(caplog.handler)
    assert any("HellaSwag is skipped" in r.getMessage() and "--hellaswag_path" in r.getMessage()
               for r in caplog.records)
    metrics, _ = ev.run(step=1)
    assert set(metrics) == {"eval/val_loss"}


def test_missing_explicit_path_is_bad_input(tmp_path) -> None:
    cfg = _cfg(hellaswag_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="--hellaswag_path"):
        Evaluator(cfg, Accelerator(cpu=True), build_model(cfg.model, seed=0), [], get_encoding())
