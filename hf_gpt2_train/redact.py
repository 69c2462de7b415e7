"""Secrets never reach a file or a log: one redaction function for everything the project writes.

:func:`redact_secrets` is applied to the configuration before it becomes ``run_info.json``, checkpoint
manifests, TensorBoard hparams/text and tracker configs (W&B), to model cards and to every log record
(console and ``train.log``, through :func:`install_log_redaction`). It replaces

* the value of every secret-named key (``hub_token``, ``*_token``, ``*api_key``, ``*password``, ``*secret``)
  by ``<redacted>``, and
* every occurrence of a known secret value inside any string: values passed to :func:`register_secret`
  (``--hub_token``) and the tokens in the environment (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``,
  ``WANDB_API_KEY``), wherever they would otherwise be echoed.

A config read back from such a file (``Config.from_dict``, ``--config resume_config.yaml``) treats
``<redacted>`` as "not given", so the token then comes from ``HF_TOKEN`` or the saved login again.
Kept free of heavy imports (the CLI loads it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from hf_gpt2_train import is_launch_rank_0

REDACTED = "<redacted>"
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|password|secret)$", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter strings are not tokens; replacing them would garble ordinary text
_registered: set[str] = set()
_warned_cli_token = False


def is_secret_key(key: str) -> bool:
    """True for names like ``hub_token``, ``token``, ``wandb_api_key`` (not ``tokens_seen``, ``max_new_tokens``)."""
    return bool(_SECRET_KEY.search(str(key)))


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that it is redacted wherever it appears from now on (this process)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        _registered.add(value)


def known_secrets() -> list[str]:
    """Registered secrets and the tokens in the environment, longest first (so no partial replacement)."""
    env = {os.environ.get(k, "") for k in SECRET_ENV_VARS}
    values = {v for v in _registered | env if v and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every known secret value replaced by ``<redacted>``."""
    for s in known_secrets() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def redact_secrets(obj: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars) with secret keys' values and known secret values redacted."""
    secrets = known_secrets() if _secrets is None else _secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if v and is_secret_key(k) else redact_secrets(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with :func:`redact_text` (installed on handlers, so child loggers pass it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = known_secrets()
        if secrets:
            message = record.getMessage()
            clean = redact_text(message, secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (once)."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def warn_token_on_command_line(flag: str = "--hub_token") -> None:
    """One warning per process (main process only) that a token in argv is visible to other users."""
    global _warned_cli_token
    if _warned_cli_token or not is_launch_rank_0():
        return
    _warned_cli_token = True
    print(f"hf-gpt2-train: WARNING: {flag} on the command line is visible to other users of this machine (ps, "
          "/proc, shell history): set HF_TOKEN in the environment or run `hf auth login` instead", file=sys.stderr,
          flush=True)
