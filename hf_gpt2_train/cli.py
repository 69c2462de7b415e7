"""`hf-gpt2-train` subcommands. Each concern registers its own; `train` is built from the config dataclasses.

Bad input ends as one line on stderr and exit code 2 (never a traceback). Building the parser imports
neither torch nor transformers (``--help``, ``presets`` and ``checkpoints list/verify`` stay fast): a
subcommand module imports its heavy dependencies inside the command, and a module that cannot (``bench``)
is registered only when its own subcommand is the one being run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

from hf_gpt2_train.config import SECTIONS, ConfigError, build_config, field_docs, parse_auto_bool, parse_bool

# The original system's flags, kept working: alias -> (field, value or None to take the given value).
ALIASES: dict[str, tuple[str, Any]] = {
    "--checkpoint_freq": ("checkpoint_steps", None),
    "--eval_freq": ("eval_steps", None),
    "--resume": ("resume_from_checkpoint", None),
    "--use_tensorboard": ("report_to", "tensorboard"),
    "--use_fp8": ("mixed_precision", "fp8"),
}

# Modules that own a subcommand (each has register_cli(subparsers)), in --help order.
SUBCOMMAND_MODULES = ("hf_gpt2_train.data.prepare", "hf_gpt2_train.evaluate", "hf_gpt2_train.checkpoint",
                      "hf_gpt2_train.hub", "hf_gpt2_train.bench", "hf_gpt2_train.data.verify")
# Modules that import numpy/torch at the top -> (subcommand, its one-line help). They are imported only when
# their subcommand is the one being run; otherwise a stub with the same help keeps it in `--help`.
HEAVY_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "hf_gpt2_train.data.prepare": ("prepare-data", "Tokenise a corpus into GPT-2 token shards (resumable)."),
    "hf_gpt2_train.bench": ("bench", "Throughput/MFU of our training step vs a plain PyTorch loop."),
}


def bool_arg(v: str) -> bool:
    """argparse type for true/false flags."""
    try:
        return parse_bool(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def auto_bool_arg(v: str) -> bool | None:
    """argparse type for true/false/auto flags (a ``bool | None`` field: None is chosen at run time)."""
    try:
        return parse_auto_bool(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (docstring as help); defaults suppressed so only given flags override."""
    p.add_argument("--preset", default=argparse.SUPPRESS, help="Named preset: gpt2, gpt2-medium, gpt2-large, "
                   "gpt2-xl, quickstart.")
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of config sections/keys.")
    for section, cls in SECTIONS.items():
        g = p.add_argument_group(section)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            t = str(f.type)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            auto = t.startswith("bool") and "None" in t  # true/false, or chosen at run time
            help_text = f"{docs.get(f.name, '')} (default: {'auto' if auto and default is None else default})"
            if t.startswith("bool"):
                g.add_argument(f"--{f.name}", nargs="?", const=True, type=auto_bool_arg if auto else bool_arg,
                               default=argparse.SUPPRESS, metavar="BOOL|auto" if auto else "BOOL", help=help_text)
                g.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
            elif t.startswith("list"):
                g.add_argument(f"--{f.name}", nargs="+", default=argparse.SUPPRESS, help=help_text)
            else:
                g.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=help_text)
    g = p.add_argument_group("aliases (the original system's flags)")
    for alias, (target, value) in ALIASES.items():
        if value is None:
            g.add_argument(alias, dest=f"alias:{target}", default=argparse.SUPPRESS, help=f"= --{target}")
        else:
            g.add_argument(alias, dest=f"alias:{target}", action="store_const", const=value,
                           default=argparse.SUPPRESS, help=f"= --{target} {value}")


def config_from_args(args: argparse.Namespace):
    given = dict(vars(args))
    preset = given.pop("preset", "")
    yaml_path = given.pop("config", "")
    for k in ("func", "command"):
        given.pop(k, None)
    cli: dict[str, Any] = {}
    for k, v in given.items():
        if k.startswith("alias:"):
            cli.setdefault(k.removeprefix("alias:"), v)
    for k, v in given.items():
        if not k.startswith("alias:"):
            cli[k] = v  # the real flag wins over its alias
    if cli.get("hub_token"):
        from hf_gpt2_train.redact import warn_token_on_command_line

        warn_token_on_command_line("--hub_token")
    return build_config(preset=preset, yaml_path=yaml_path, cli=cli)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad flags fail before torch is imported
    from hf_gpt2_train.trainer import train

    return train(cfg)


def _cmd_presets(args: argparse.Namespace) -> int:
    from hf_gpt2_train.config import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:12s} {p['model']}")
    return 0


def _command_in(argv: list[str]) -> str:
    """The subcommand named in argv (the top-level parser has no options that take a value)."""
    return next((a for a in argv if not a.startswith("-")), "")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full command line; ``argv`` (default: sys.argv) decides which heavy subcommand is really built."""
    command = _command_in(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-gpt2-train", description="GPT-2 pretraining on HF Accelerate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tp = sub.add_parser("train", help="Train GPT-2 (single process, accelerate launch or torchrun).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(tp)
    tp.set_defaults(func=_cmd_train)
    pp = sub.add_parser("presets", help="List the named presets.")
    pp.set_defaults(func=_cmd_presets)
    for module in SUBCOMMAND_MODULES:
        name, help_text = HEAVY_SUBCOMMANDS.get(module, ("", ""))
        if name and name != command:
            sub.add_parser(name, help=help_text, add_help=False)  # never parsed: argv names another command
        else:
            importlib.import_module(module).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from hf_gpt2_train.errors import (
        EXIT_NONFINITE,
        EXIT_PEER_LOST,
        EXIT_SPIKE,
        CheckpointSaveError,
        NonFiniteLossError,
        SpikeRollbackError,
    )

    args = build_parser(argv).parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as e:
        # The same error on every rank is printed once per node (each node of a cluster has its own console).
        if not e.every_process or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            print(f"hf-gpt2-train: error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteLossError as e:
        print(f"hf-gpt2-train: training stopped: {e}", file=sys.stderr)
        code = EXIT_NONFINITE
    except SpikeRollbackError as e:
        print(f"hf-gpt2-train: training stopped: {e}", file=sys.stderr)
        code = EXIT_SPIKE
    except CheckpointSaveError as e:
        print(f"hf-gpt2-train: checkpoint not saved (earlier checkpoints are intact): {e}", file=sys.stderr)
        code = 1
    except RuntimeError as e:  # a collective failed because another process (node) is gone: one line, exit 6
        from hf_gpt2_train.resilience.peers import lost_peer_message

        if (message := lost_peer_message(e)) is None:
            raise
        print(f"hf-gpt2-train: training stopped: {message}", file=sys.stderr)
        code = EXIT_PEER_LOST
    from hf_gpt2_train.process_exit import leave

    leave(code or 0)  # a process of a multi-process run skips the interpreter teardown (gloo aborts in it)
