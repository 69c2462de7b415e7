"""The trainer's evaluation component: decides when to evaluate and runs val loss, HellaSwag and samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_gpt2_train.config import Config, ConfigError
from hf_gpt2_train.evaluate.hellaswag import hellaswag_eval, load_hellaswag
from hf_gpt2_train.evaluate.samples import generate_samples
from hf_gpt2_train.evaluate.val import val_loss

logger = logging.getLogger(__name__)


class Evaluator:
    """Evaluation every ``cfg.eval.eval_steps`` optimizer steps and at the end of training.

    Construct it after ``accelerator.prepare``: the HellaSwag file is read (or downloaded once, by the
    main process first) here, so a bad ``--hellaswag_path`` fails before any training step runs. Without
    a path and without network, HellaSwag is skipped with one warning (training goes on).
    ``model`` is the prepared (possibly DDP-wrapped) model with its uncompiled forward; every rank must
    call :meth:`run` at the same steps (it reduces across ranks).
    """

    def __init__(self, cfg: Config, accelerator: Any, model: nn.Module,
                 val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], enc: Any) -> None:
        self.cfg, self.accelerator, self.model, self.enc = cfg, accelerator, model, enc
        self.val_batches = list(val_batches)
        self.hellaswag: list[dict[str, Any]] = []
        if cfg.eval.hellaswag:
            self.hellaswag = self._load_hellaswag()
        elif accelerator.is_main_process:
            logger.info("HellaSwag is off for this run: pass --hellaswag_path /path/to/hellaswag_val.jsonl (or "
                        "--hellaswag true to download it once) to score it at each evaluation")

    def _load_hellaswag(self) -> list[dict[str, Any]]:
        """The HellaSwag rows; a failed download (no --hellaswag_path given) skips HellaSwag with a warning.

        A run must not die for want of network (the quickstart trains offline), but a path the user gave
        that is missing or malformed is bad input and raises ConfigError.
        """
        if self.cfg.eval.hellaswag_path:  # a local file: every rank reads it (and fails alike if it is bad)
            return load_hellaswag(self.cfg.eval.hellaswag_path)
        with self.accelerator.main_process_first():  # one download; the other ranks read the cached file
            try:
                return load_hellaswag()
            except ConfigError as e:
                logger.warning("HellaSwag is skipped for this run: %s (or pass --hellaswag false)", e)
                return []

    def due(self, step: int, final: bool = False) -> bool:
        """True at every ``eval_steps``-th optimizer step and at the final step."""
        every = self.cfg.eval.eval_steps
        return final or (every > 0 and step > 0 and step % every == 0)

    def run(self, step: int) -> tuple[dict[str, float], list[str]]:
        """Evaluate now. Returns tracker scalars and ``"prompt -> completion"`` sample lines.

        Scalars: ``eval/val_loss`` (when val batches exist), ``eval/hellaswag_acc`` and
        ``eval/hellaswag_acc_norm`` (when HellaSwag is on), same values on every rank.
        """
        e, acc = self.cfg.eval, self.accelerator
        vocab = self.cfg.model.vocab_size
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        hs_count = 0
        if self.val_batches:
            metrics["eval/val_loss"] = val_loss(self.model, self.val_batches, acc, vocab)
        if self.hellaswag:
            hs = hellaswag_eval(self.model, self.hellaswag, self.enc, acc, vocab, limit=e.hellaswag_limit)
            metrics["eval/hellaswag_acc"] = hs["acc"]
            metrics["eval/hellaswag_acc_norm"] = hs["acc_norm"]
            hs_count = hs["count"]
        samples: list[str] = []
        if e.sample_prompts and e.sample_max_new_tokens > 0:
            # every rank samples the same prompts with the same seed: identical text, identical call count
            completions = generate_samples(self.model, self.enc, e.sample_prompts, e.sample_max_new_tokens,
                                           e.sample_top_k, self.cfg.run.seed, vocab, acc.device, acc.autocast)
            # completions usually start with a space (GPT-2 BPE); drop it after the arrow for readability
            samples = [f"{p} -> {c.lstrip()}" for p, c in zip(e.sample_prompts, completions, strict=True)]
        if acc.is_main_process:  # the values themselves are logged by the tracker; say what it cost
            logger.info("evaluation at step %d took %.1fs (%d val batches/process, %s HellaSwag examples)", step,
                        time.perf_counter() - t0, len(self.val_batches), hs_count)
        return metrics, samples
