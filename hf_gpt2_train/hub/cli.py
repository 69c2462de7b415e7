"""`export` and `push` subcommands (registered by hf_gpt2_train.cli through register_cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

CHECKPOINT_HELP = ("A checkpoint folder (OUTPUT_DIR/checkpoints/best), an output dir (with --tier, default: "
                   "final, else best, else latest), or a tier name best/latest/final/backup with --output_dir.")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="", help="Output dir of the run, when CHECKPOINT is a tier name.")
    p.add_argument("--tier", default="", help="Tier to take when CHECKPOINT is an output dir.")
    p.add_argument("--out", default="", help="Export folder (default: OUTPUT_DIR/hf_export/<tier>, or "
                   "<checkpoint>_hf next to a checkpoint outside an output dir).")
    p.add_argument("--tokenizer_file", default="", help="Another gpt2.tiktoken (default: the run's own, else the "
                   "GPT-2 vocabulary shipped in the package).")
    p.add_argument("--license", default="mit", help="License of the weights, as a Hub license id.")


def _export(args: argparse.Namespace, repo_id: str) -> Path:
    from hf_gpt2_train.hub.export import default_export_dir, export_hf, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint, output_dir=args.output_dir, tier=args.tier)
    out = Path(args.out) if args.out else default_export_dir(checkpoint)
    export_hf(checkpoint, out, tokenizer_file=args.tokenizer_file, license=args.license, repo_id=repo_id)
    print(f"exported {checkpoint} -> {out}", flush=True)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    _export(args, repo_id=args.hub_model_id)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from hf_gpt2_train.hub.export import is_export_dir
    from hf_gpt2_train.hub.push import push_to_hub

    if args.hub_token:
        from hf_gpt2_train.redact import register_secret, warn_token_on_command_line

        warn_token_on_command_line("--hub_token")
        register_secret(args.hub_token)
    src = Path(args.checkpoint)
    # An existing export (e.g. left by a failed push) is pushed as it is; anything else is exported first.
    export_dir = src if is_export_dir(src) else _export(args, repo_id=args.hub_model_id)
    url = push_to_hub(export_dir, args.hub_model_id, private=args.hub_private, token=args.hub_token or None)
    print(f"pushed {export_dir} -> {url}", flush=True)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `export` and `push` to the hf-gpt2-train command line."""
    ep = subparsers.add_parser("export", help="Export a checkpoint as a transformers GPT-2 folder (model, "
                               "tokenizer, model card).", description=CHECKPOINT_HELP)
    ep.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    _add_source_args(ep)
    ep.add_argument("--hub_model_id", default="", help="Repository id shown in the card's loading snippet.")
    ep.set_defaults(func=cmd_export)

    pp = subparsers.add_parser("push", help="Export a checkpoint (or take an export folder) and push it to the "
                               "Hugging Face Hub.", description=CHECKPOINT_HELP + " An export folder is pushed as is.")
    pp.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP + " Or an export folder.")
    _add_source_args(pp)
    pp.add_argument("--hub_model_id", required=True, help="Hub repository id, e.g. user/gpt2-fineweb.")
    pp.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    pp.add_argument("--hub_token", default="", help="Hub token (else HF_TOKEN or the saved `hf auth login`).")
    pp.set_defaults(func=cmd_push)
