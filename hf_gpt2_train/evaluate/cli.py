"""``hf-gpt2-train eval CHECKPOINT_OR_HF_DIR``: val loss and HellaSwag of a saved model, printed as JSON.

Runs on one process or under ``torchrun`` / ``accelerate launch`` (examples and val batches are split
across ranks and the sums reduced; only the main process prints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_gpt2_train.cli import bool_arg
from hf_gpt2_train.config import ConfigError


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {n}")
        return n

    return parse


def _training_seq_len(path: Path) -> int:
    """The seq_len the checkpoint was trained with (so val_loss matches the trainer's), 0 if unknown."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return 0
    return int(json.loads(manifest.read_text()).get("config", {}).get("optim", {}).get("seq_len", 0))


def register_cli(subparsers: Any) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval", help="Evaluate a checkpoint or HF export: val loss (given --data_dir) and HellaSwag, as JSON.",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_HF_DIR",
                   help="A checkpoint folder (OUTPUT_DIR/checkpoints/<tier>) or an exported HF model folder.")
    p.add_argument("--data_dir", default="", help="Token shards for val_loss, or 'embedded' for the quickstart's "
                   "embedded corpus (omitted: no val_loss).")
    p.add_argument("--val_batches", type=_int_at_least(1), default=20, help="Val micro-batches per process.")
    p.add_argument("--seq_len", type=_int_at_least(0), default=0,
                   help="Tokens per val sequence (0: the model's context, at most 1024).")
    p.add_argument("--batch_size", type=_int_at_least(1), default=8, help="Sequences per val micro-batch.")
    p.add_argument("--hellaswag", type=bool_arg, nargs="?", const=True, default=True, metavar="BOOL",
                   help="Score HellaSwag.")
    p.add_argument("--no_hellaswag", dest="hellaswag", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--hellaswag_path", default="", help="Local hellaswag_val.jsonl (else downloaded once to the cache).")
    p.add_argument("--hellaswag_limit", type=_int_at_least(0), default=0, help="Score only the first N examples (0: all).")
    p.add_argument("--hellaswag_batch_examples", type=_int_at_least(1), default=4,
                   help="HellaSwag examples (x4 endings) per forward pass.")
    p.add_argument("--tokenizer_file", default="",
                   help="Another gpt2.tiktoken ranks file (default: the GPT-2 vocabulary shipped in the package).")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Autocast for evaluation (default: what the accelerate config says).")
    p.add_argument("--output", default="", help="Also write the JSON to this file.")
    p.set_defaults(func=run_eval_cli)


def _check_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist: pass a checkpoint folder (OUTPUT_DIR/checkpoints/<tier>) or an "
                          "exported HF model folder")
    if (p / "checkpoints").is_dir() and not (p / "config.json").exists():
        tiers = sorted(d.name for d in (p / "checkpoints").iterdir() if (d / "manifest.json").is_file())
        example = p / "checkpoints" / (next((t for t in ("final", "best", "latest") if t in tiers), None)
                                       or (tiers[0] if tiers else "final"))
        raise ConfigError(f"{p} is a run's output folder, not a checkpoint: pass one of its checkpoints, e.g. "
                          f"{example}" + (f" (available: {', '.join(tiers)})" if tiers else ""))
    return p


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed ``eval`` arguments; returns the JSON-able result."""
    from accelerate import Accelerator

    from hf_gpt2_train.evaluate.hellaswag import hellaswag_eval, load_hellaswag
    from hf_gpt2_train.evaluate.val import val_loss
    from hf_gpt2_train.model import load_trained_model

    path = _check_path(args.checkpoint)
    if not args.data_dir and not args.hellaswag:
        raise ConfigError("nothing to evaluate: pass --data_dir for val_loss, or leave HellaSwag on")
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    acc = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision)
    enc = _encoding(args.tokenizer_file)
    examples: list[dict[str, Any]] = []
    if args.hellaswag_path and args.hellaswag:  # read before the model, so a bad path fails fast
        examples = load_hellaswag(args.hellaswag_path)
    elif args.hellaswag:
        with acc.main_process_first():  # one download; the other ranks then read the cached file
            examples = load_hellaswag()
    data_dir = _resolve_data_dir(args.data_dir, args.tokenizer_file, acc) if args.data_dir else None
    model, mcfg = load_trained_model(str(path), device=str(acc.device))
    result: dict[str, Any] = {"checkpoint": str(path), "world_size": acc.num_processes}
    if data_dir is not None:
        from hf_gpt2_train.data.loader import val_batches

        seq_len = args.seq_len or _training_seq_len(path) or min(mcfg.n_positions, 1024)
        if seq_len > mcfg.n_positions:
            raise ConfigError(f"--seq_len {seq_len} exceeds the model's context {mcfg.n_positions}: lower --seq_len")
        batches = val_batches(data_dir, seq_len, args.batch_size, args.val_batches, acc.process_index,
                              acc.num_processes)
        result["val_loss"] = val_loss(model, batches, acc, mcfg.vocab_size)
        result["val_tokens"] = sum(y.numel() for _, y in batches) * acc.num_processes
    if args.hellaswag:
        hs = hellaswag_eval(model, examples, enc, acc, mcfg.vocab_size, limit=args.hellaswag_limit,
                            batch_examples=args.hellaswag_batch_examples)
        result.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"], hellaswag_count=hs["count"])
    return result


def _encoding(tokenizer_file: str) -> Any:
    """The project's GPT-2 tokenizer (tiktoken ``gpt2``, or a local ``gpt2.tiktoken`` file)."""
    from hf_gpt2_train.data.tokenizer import get_encoding

    return get_encoding(tokenizer_file)


def _resolve_data_dir(data_dir: str, tokenizer_file: str, acc: Any) -> Path:
    """The shard folder for val_loss; ``embedded`` is the quickstart's corpus (prepared once into the cache)."""
    from hf_gpt2_train.config import DataConfig
    from hf_gpt2_train.data.loader import resolve_data_dir

    folder = "" if data_dir == "embedded" else data_dir  # the loader reads "" as the embedded corpus
    with acc.main_process_first():
        return resolve_data_dir(DataConfig(data_dir=folder, tokenizer_file=tokenizer_file))


def run_eval_cli(args: argparse.Namespace) -> int:
    """``eval`` entry point: prints one JSON object on the main process."""
    from accelerate import PartialState

    result = evaluate_checkpoint(args)
    if PartialState().is_main_process:
        text = json.dumps(result, indent=2)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
        print(text)
        sys.stdout.flush()
    return 0
