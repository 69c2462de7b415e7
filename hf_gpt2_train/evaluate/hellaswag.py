"""HellaSwag: completion-style scoring of the 10,042-row validation set, spread across ranks.

Tokenization (the leading-space rule; getting it wrong costs several points):

* the context is encoded as is: ``enc.encode(example["ctx"])`` (HellaSwag contexts never end in a space);
* each ending is encoded **with one leading space**: ``enc.encode(" " + ending)``, because GPT-2's BPE
  folds the space into the next word (``" is"`` is one token, id 318; ``"is"`` is id 271). Encoding the
  ending without the space scores a word-boundary the model never saw in training.
* a candidate row is ``ctx_tokens + ending_tokens``; only the ending tokens are scored (each predicted
  from everything before it). This is exactly what build-nanogpt's ``hellaswag.py`` does.
* a row longer than the model's context (``n_positions``) keeps its last ``n_positions`` tokens: the
  start of the context is dropped, never the ending.

Per example and ending: ``sum_loss`` = total cross entropy of the ending tokens, ``mean_loss`` =
``sum_loss`` / number of ending tokens. ``acc`` counts examples whose label has the lowest ``sum_loss``,
``acc_norm`` the lowest ``mean_loss`` (the number usually quoted: OpenAI's GPT-2 124M scores about 0.295 in build-nanogpt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.evaluate.common import base_model, eval_mode, supports_logits_to_keep
from hf_gpt2_train.fsio import atomic_writer
from hf_gpt2_train.model import lm_logits, lm_loss

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# Published checksum of the validation file: a download that does not match is never cached.
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
HELLASWAG_ROWS = 10042
NUM_ENDINGS = 4


def cache_root() -> Path:
    """Download cache: ``$HF_GPT2_TRAIN_CACHE`` or ``~/.cache/hf_gpt2_train``."""
    return Path(os.environ.get("HF_GPT2_TRAIN_CACHE") or Path.home() / ".cache" / "hf_gpt2_train")


def _download(url: str, dest: Path, sha256: str) -> None:
    """Download ``url`` to ``dest`` atomically (:func:`~hf_gpt2_train.fsio.atomic_writer`), checksum first."""
    h = hashlib.sha256()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(dest, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
            if h.hexdigest() != sha256:  # raised inside the writer: the temp file is dropped, nothing cached
                raise ConfigError(f"HellaSwag download from {url} is corrupt (sha256 {h.hexdigest()[:12]}... != "
                                  f"{sha256[:12]}...): retry, or pass --hellaswag_path FILE")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"could not download HellaSwag from {url} ({reason}): on an offline machine pass "
                          "--hellaswag_path /path/to/hellaswag_val.jsonl") from None


def _parse(path: Path) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = {"ctx": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])}
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{lineno} is not a HellaSwag row (needs ctx, endings, label): "
                                  "pass the original hellaswag_val.jsonl as --hellaswag_path") from None
            if (not isinstance(ex["ctx"], str) or len(ex["endings"]) != NUM_ENDINGS
                    or not all(isinstance(e, str) for e in ex["endings"]) or not 0 <= ex["label"] < NUM_ENDINGS):
                raise ConfigError(f"{path}:{lineno} is not a HellaSwag row (ctx, 4 endings, label 0-3): "
                                  "pass the original hellaswag_val.jsonl as --hellaswag_path")
            examples.append(ex)
    if not examples:
        raise ConfigError(f"{path} holds no HellaSwag rows: pass the original hellaswag_val.jsonl as --hellaswag_path")
    return examples


def load_hellaswag(path: str = "", cache_dir: str | None = None, url: str = "") -> list[dict[str, Any]]:
    """HellaSwag validation rows (``ctx``, ``endings``, ``label``).

    ``path``: a local ``hellaswag_val.jsonl``. Otherwise the file is downloaded once from its public source
    (``url``, default :data:`HELLASWAG_URL`; ``$HF_GPT2_TRAIN_HELLASWAG_URL`` overrides it, e.g. for a
    mirror) into ``cache_dir`` (default :func:`cache_root` ``/hellaswag``), checked against the published
    sha256, and read from there afterwards. No network: :class:`ConfigError` naming ``--hellaswag_path``.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"HellaSwag file {p} does not exist: check --hellaswag_path")
        return _parse(p)
    dest = Path(cache_dir) if cache_dir else cache_root() / "hellaswag"
    dest = dest / "hellaswag_val.jsonl"
    if not dest.is_file():
        _download(url or os.environ.get("HF_GPT2_TRAIN_HELLASWAG_URL") or HELLASWAG_URL, dest, HELLASWAG_SHA256)
    return _parse(dest)


@dataclass
class RenderedExample:
    """One example as model input: a token row per ending and which positions belong to the ending."""

    rows: list[list[int]]
    """``ctx_tokens + ending_tokens`` per ending, cropped on the left to the model's context."""
    ending_mask: list[list[int]]
    """1 where the token belongs to the ending (the scored tokens), else 0; same shape as rows."""
    label: int


def render_example(example: dict[str, Any], enc: Any, n_positions: int) -> RenderedExample:
    """Tokenize one example following the leading-space rule in the module docstring."""
    ctx = enc.encode(example["ctx"])
    rows: list[list[int]] = []
    masks: list[list[int]] = []
    for ending in example["endings"]:
        end = enc.encode(" " + ending)  # the space belongs to the ending's first token (GPT-2 BPE)
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        rows.append(row[-n_positions:])
        masks.append(mask[-n_positions:])
    return RenderedExample(rows, masks, int(example["label"]))


def _score_batch(model: nn.Module, batch: Sequence[RenderedExample], vocab_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_loss, mean_loss), each ``[len(batch), 4]`` float32, for a batch of rendered examples.

    All candidate rows go through one forward, right-padded with token 0: attention is causal, so
    padding after a row's end cannot change the logits of the row's own tokens, and padded positions are
    masked out of the loss.
    """
    rows = [r for ex in batch for r in ex.rows]
    masks = [m for ex in batch for m in ex.ending_mask]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    tokens, mask = tokens.to(device), mask.to(device)
    # Only ending tokens are scored: the lm_head (the largest matmul of a small GPT-2) and the loss run
    # from the first logit that predicts an ending token onwards. Logit j predicts token j + 1.
    first = min(m.index(1) for m in masks) - 1 if all(1 in m for m in masks) else 0
    first = max(first, 0) if supports_logits_to_keep(model) else 0
    if first > 0:
        logits = model(input_ids=tokens, logits_to_keep=width - first).logits[..., :vocab_size]
    else:
        logits = lm_logits(model, tokens, vocab_size)
    losses = lm_loss(logits[:, :-1], tokens[:, first + 1:], reduction="none").view(len(rows), -1)
    m = mask[:, first + 1:]
    sum_loss = (losses * m).sum(1)
    mean_loss = sum_loss / m.sum(1).clamp_min(1.0)
    return sum_loss.view(len(batch), -1), mean_loss.view(len(batch), -1)


def score_examples(model: nn.Module, examples: Sequence[dict[str, Any]], enc: Any, vocab_size: int,
                   batch_examples: int = 4, device: torch.device | str | None = None,
                   autocast: Callable[[], AbstractContextManager] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ending (sum_loss, mean_loss), each ``[len(examples), 4]`` on CPU; one process, no reduction.

    ``autocast``: e.g. ``accelerator.autocast`` (default: none, the model's own dtype).
    """
    base = base_model(model)
    dev = torch.device(device) if device is not None else next(base.parameters()).device
    n_pos = base.config.n_positions
    sums, means = [], []
    with eval_mode(model), torch.no_grad(), (autocast or contextlib.nullcontext)():
        for i in range(0, len(examples), batch_examples):
            batch = [render_example(ex, enc, n_pos) for ex in examples[i: i + batch_examples]]
            s, m = _score_batch(model, batch, vocab_size, dev)
            sums.append(s.float().cpu())
            means.append(m.float().cpu())
    if not sums:
        return torch.zeros(0, NUM_ENDINGS), torch.zeros(0, NUM_ENDINGS)
    return torch.cat(sums), torch.cat(means)


def hellaswag_eval(model: nn.Module, examples: Sequence[dict[str, Any]], enc: Any, accelerator: Any,
                   vocab_size: int, limit: int = 0, batch_examples: int = 4) -> dict[str, float]:
    """HellaSwag ``{"acc", "acc_norm", "count"}`` over the first ``limit`` examples (0: all).

    Example ``i`` is scored by rank ``i % num_processes``; correct counts are summed across ranks, so the
    result does not depend on the number of processes. Every rank makes the same number of forward calls
    (a rank short of work runs a one-token dummy forward), so a wrapper whose forward communicates (FSDP,
    DDP buffer broadcast) stays in step. Runs in eval mode under ``torch.no_grad`` and
    ``accelerator.autocast()``; the model's train/eval mode is restored afterwards.
    """
    if limit > 0:
        examples = examples[:limit]
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [ex for i, ex in enumerate(examples) if i % world == rank]
    n_batches = -(-((len(examples) + world - 1) // world) // batch_examples)  # the busiest rank's batches
    base = base_model(model)
    n_pos, dev = base.config.n_positions, accelerator.device
    totals = torch.zeros(3, dtype=torch.float64, device=dev)  # correct (acc), correct (acc_norm), count
    with eval_mode(model), torch.no_grad(), accelerator.autocast():
        for b in range(n_batches):
            chunk = mine[b * batch_examples: (b + 1) * batch_examples]
            if not chunk:
                lm_logits(model, torch.zeros(1, 1, dtype=torch.long, device=dev), vocab_size)
                continue
            batch = [render_example(ex, enc, n_pos) for ex in chunk]
            sum_loss, mean_loss = _score_batch(model, batch, vocab_size, dev)
            labels = torch.tensor([ex.label for ex in batch], device=dev)
            totals[0] += (sum_loss.argmin(1) == labels).sum()
            totals[1] += (mean_loss.argmin(1) == labels).sum()
            totals[2] += len(batch)
    totals = accelerator.reduce(totals, reduction="sum")
    count = int(totals[2].item())
    return {"acc": totals[0].item() / max(count, 1), "acc_norm": totals[1].item() / max(count, 1),
            "count": count}
