"""Push an export folder to the Hugging Face Hub, standalone or at the end of training.

Only the export (model, tokenizer, card, loss curve) is uploaded, never checkpoints or optimizer state:
the upload is restricted to the files export_hf wrote. ``HF_ENDPOINT`` selects another Hub (tests point
it at a local stand-in). Every failure (no token, rejected token, no network, offline mode) becomes one
clear line naming the fix; the export stays on disk so the push can be retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hf_gpt2_train.config import ConfigError

log = logging.getLogger(__name__)


def _retry_hint(export_dir: Path, repo_id: str) -> str:
    return f"the export is kept at {export_dir}: retry with `hf-gpt2-train push {export_dir} --hub_model_id {repo_id}`"


def _is_network_error(e: BaseException) -> bool:
    root = type(e).__module__.split(".")[0]
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or root in ("httpx", "httpx2", "requests",
                                                                                "urllib3", "hf_xet")


def push_to_hub(export_dir: Path, hub_model_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "") -> str:
    """``create_repo(exist_ok=True)`` + ``upload_folder`` of an export; returns the repository URL.

    The token is ``token``, else ``HF_TOKEN``, else the saved ``hf auth login``.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    from hf_gpt2_train.hub.export import is_export_dir

    export_dir = Path(export_dir)
    if not is_export_dir(export_dir):
        raise ConfigError(f"{export_dir} is not an hf-gpt2-train export: run `hf-gpt2-train export CHECKPOINT "
                          f"--out DIR` first, or push the checkpoint itself")
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError:
        raise ConfigError(f"--hub_model_id {hub_model_id!r} is not a valid Hub repository id: use USER/NAME") from None
    hint = _retry_hint(export_dir, hub_model_id)
    if constants.is_offline_mode():
        raise ConfigError(f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE; {hint}")
    token = token or get_token()
    if not token:
        raise ConfigError(f"no Hugging Face token: pass --hub_token, set HF_TOKEN or run `hf auth login`; {hint}")
    files = sorted(p.name for p in export_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    api = HfApi(token=token)
    try:
        url = api.create_repo(hub_model_id, private=True if private else None, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=hub_model_id, folder_path=str(export_dir), repo_type="model",
                          allow_patterns=files,  # exactly the export's files, nothing that lands there later
                          commit_message=commit_message or f"Upload {export_dir.name} exported by hf-gpt2-train")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise ConfigError(f"the Hub rejected the token (401): pass a valid write token with --hub_token or "
                              f"HF_TOKEN, or run `hf auth login`; {hint}") from None
        if status == 403:
            raise ConfigError(f"the token may not write to {hub_model_id} (403): use a write token of that user or "
                              f"organisation, or another --hub_model_id; {hint}") from None
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(f"the Hub refused the push ({status}: {first}): fix that, then retry; {hint}") from None
    except OfflineModeIsEnabled:
        raise ConfigError(f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE; {hint}") from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise ConfigError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__}): check the network "
                          f"connection (and HF_ENDPOINT); {hint}") from None
    return str(url)


@dataclass
class PushResult:
    """Outcome of the end-of-training export and push (errors are reported, never raised)."""

    export_dir: Path | None
    url: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def export_and_push_after_training(output_dir: str | Path, cfg) -> PushResult:
    """Export ``OUTPUT_DIR/checkpoints/final`` to ``OUTPUT_DIR/hf_export/final`` and push it (``--push_to_hub``).

    Call on the main process after the final checkpoint is complete (``end.push_at_end`` does, on
    ``accelerator.is_main_process``). Only reads the checkpoint, so a
    failure here can never damage it; failures are logged as one line and returned, not raised.
    """
    from hf_gpt2_train.hub.export import default_export_dir, export_hf, resolve_checkpoint

    hub = cfg.hub
    export_dir: Path | None = None
    try:
        checkpoint = resolve_checkpoint("final", output_dir=str(output_dir))
        export_dir = default_export_dir(checkpoint)
        export_hf(checkpoint, export_dir, tokenizer_file=cfg.data.tokenizer_file, repo_id=hub.hub_model_id)
        log.info("exported %s to %s", checkpoint, export_dir)
        url = push_to_hub(export_dir, hub.hub_model_id, private=hub.hub_private, token=hub.hub_token or None,
                          commit_message=f"Upload step {_step_of(checkpoint)} of {Path(output_dir).name}")
    except ConfigError as e:
        log.error("push to the Hub failed: %s (training results are saved)", e)
        return PushResult(export_dir=export_dir, error=str(e))
    except Exception as e:  # anything unexpected: report it, the checkpoints are already safe on disk
        msg = f"{type(e).__name__}: {e}"
        log.error("export/push after training failed: %s (training results are saved)", msg)
        return PushResult(export_dir=export_dir, error=msg)
    log.info("pushed %s to %s", export_dir, url)
    return PushResult(export_dir=export_dir, url=url)


def _step_of(checkpoint: Path) -> int | str:
    import json

    try:
        return int(json.loads((checkpoint / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
