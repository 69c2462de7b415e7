"""Export a training checkpoint as a stock Hugging Face GPT-2 folder.

The folder holds ``model.safetensors`` + ``config.json`` + ``generation_config.json`` (a plain
``GPT2LMHeadModel``: Conv1D layout, vocabulary trimmed back to the tokenizer's 50,257 ids), the GPT-2
tokenizer converted from tiktoken, a ``README.md`` model card and ``loss_curve.png``. transformers loads
it offline with no custom code.

The export is written into a temporary sibling folder and renamed into place, so a crash or a full disk
never leaves a half export under the requested name; an existing folder is only replaced when it is an
earlier export (recognised by its card's ``hf-gpt2-train`` tag), never a folder of something else.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hf_gpt2_train.config import ConfigError, ModelConfig
from hf_gpt2_train.fsio import fsync_dir, fsync_path
from hf_gpt2_train.redact import redact_secrets

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

TIERS = ("final", "best", "latest", "latest_backup")
TIER_ALIASES = {"backup": "latest_backup"}


def is_checkpoint_dir(p: Path) -> bool:
    return (p / "manifest.json").is_file() and (p / "model.safetensors").is_file()


def is_export_dir(p: Path) -> bool:
    """A folder written by export_hf: an HF model folder whose card carries our tag, and no checkpoint."""
    import yaml

    from hf_gpt2_train.hub.card import CARD_TAG

    if not ((p / "config.json").is_file() and (p / "README.md").is_file()) or (p / "manifest.json").exists():
        return False
    text = (p / "README.md").read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return False
    try:
        meta = yaml.safe_load(text[4:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and CARD_TAG in (meta.get("tags") or [])


def resolve_checkpoint(spec: str, output_dir: str = "", tier: str = "") -> Path:
    """Turn what the user typed into a checkpoint folder.

    Accepted: a checkpoint folder (``OUTPUT_DIR/checkpoints/best``); an output dir (``OUTPUT_DIR``, with
    ``tier`` or else the first of final/best/latest that exists); or a tier name (``best``, ``latest``,
    ``final``, ``latest_backup``/``backup``) together with ``output_dir``.
    """
    name = TIER_ALIASES.get(spec, spec)
    if name in TIERS and not Path(spec).exists():
        if not output_dir:
            raise ConfigError(f"'{spec}' names a checkpoint tier of an output dir: add --output_dir OUTPUT_DIR "
                              f"(or pass OUTPUT_DIR/checkpoints/{name})")
        return _valid(Path(output_dir) / "checkpoints" / name)
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(f"{p} does not exist: pass a checkpoint folder, an output dir, or best/latest/final "
                          "with --output_dir OUTPUT_DIR")
    if (p / "checkpoints").is_dir() and not is_checkpoint_dir(p):
        ckpts = p / "checkpoints"
        if tier:
            return _valid(ckpts / TIER_ALIASES.get(tier, tier))
        for t in TIERS:
            if is_checkpoint_dir(ckpts / t):
                return _valid(ckpts / t)
        have = sorted(c.name for c in ckpts.iterdir() if c.is_dir()) or ["none"]
        raise ConfigError(f"{ckpts} has no complete final/best/latest checkpoint (found: {', '.join(have)}): "
                          f"pass one with --tier NAME or the checkpoint folder itself")
    if tier:
        raise ConfigError(f"--tier {tier} applies to an output dir, but {p} is not one (no checkpoints/ folder): "
                          "drop --tier or pass OUTPUT_DIR")
    return _valid(p)


def _valid(p: Path) -> Path:
    """``p`` if it is a complete, intact checkpoint (manifest, sizes, and the weights' checksum)."""
    from hf_gpt2_train.checkpoint import CheckpointInvalid, verify
    from hf_gpt2_train.checkpoint.atomic import check_hashes

    if not p.is_dir():
        siblings = sorted(c.name for c in p.parent.iterdir() if c.is_dir()) if p.parent.is_dir() else []
        hint = f" (available: {', '.join(siblings)})" if siblings else ""
        raise ConfigError(f"checkpoint {p} does not exist{hint}: pass an existing checkpoint")
    fix = "export another tier, e.g. latest_backup (`hf-gpt2-train checkpoints list OUTPUT_DIR` shows them)"
    v = verify(p, hashes=False)  # sizes of every file; only the weights are read below, so only they are hashed
    if not v.ok:
        raise ConfigError(f"{p} is not a complete checkpoint ({v.reason}): {fix}")
    weights = v.manifest["files"].get("model.safetensors")
    if weights is None:
        raise ConfigError(f"{p} has no model.safetensors: export a checkpoint written with safetensors")
    try:
        check_hashes(p, v.manifest, only=["model.safetensors"])
    except CheckpointInvalid:
        raise ConfigError(f"{p}/model.safetensors does not match its manifest's checksum (damaged): {fix}") from None
    return p


def default_export_dir(checkpoint: Path) -> Path:
    """OUTPUT_DIR/hf_export/<tier> for a checkpoint of an output dir, else <checkpoint>_hf next to it."""
    from hf_gpt2_train.hub.card import run_dir_of

    run_dir = run_dir_of(checkpoint)
    if run_dir is not None:
        return run_dir / "hf_export" / checkpoint.name
    return checkpoint.parent / f"{checkpoint.name}_hf"


def _check_out_dir(out_dir: Path, checkpoint: Path) -> None:
    out, ck = out_dir.resolve(), checkpoint.resolve()
    if out == ck or ck in out.parents or out in ck.parents:
        raise ConfigError(f"--out {out_dir} overlaps the checkpoint {checkpoint}: export to a separate folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file: choose a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export_dir(out_dir):
        raise ConfigError(f"--out {out_dir} exists and is not an hf-gpt2-train export: choose another --out "
                          "(nothing was changed)")


def _recover(out_dir: Path) -> None:
    """Clean up after an export that was killed: drop its temp folder, or finish its swap."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.export-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.export-old-*")):
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the earlier export is still whole, put it back
            os.replace(old, out_dir)


def export_config(mcfg: ModelConfig) -> GPT2Config:
    """The export's config: every key of OpenAI's own gpt2 config.json, so tools written against the original
    checkpoints read it (llama.cpp's convert_hf_to_gguf.py reads ``n_ctx``, which transformers no longer writes)."""
    from hf_gpt2_train.model import hf_config

    cfg = hf_config(mcfg, padded=False)
    cfg.use_cache = True  # training turns the KV cache off; generation from the export wants it
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.n_ctx = mcfg.n_positions
    cfg.task_specific_params = {"text-generation": {"do_sample": True, "max_length": min(50, mcfg.n_positions)}}
    return cfg


def _build_hf_model(state: dict, mcfg: ModelConfig) -> GPT2LMHeadModel:
    """A stock GPT2LMHeadModel holding ``state`` (HF layout), built without a throw-away random init."""
    import torch
    from transformers import GenerationConfig, GPT2LMHeadModel

    cfg = export_config(mcfg)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConfigError(f"checkpoint weights do not fit GPT-2 {mcfg}: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}: export a checkpoint of this project")
    model.tie_weights()
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # transformers versions with non-persistent buffers (causal masks): build on CPU and copy instead.
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,  # pad=eos: no warning on every generate
        do_sample=True, top_k=50,
    )
    return model.eval()


def _finish_files(root: Path) -> None:
    """Give every file the user's normal permissions (some writers use 0600 temp files) and fsync it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in root.iterdir():
        p.chmod(0o666 & ~umask)
    for p in [*root.iterdir(), root]:
        fsync_path(p)


def export_hf(checkpoint: Path, out_dir: Path, tokenizer_file: str = "", *, license: str = "mit",
              repo_id: str = "") -> Path:
    """Write the HF export of ``checkpoint`` to ``out_dir`` atomically; returns ``out_dir``.

    ``tokenizer_file``: the gpt2.tiktoken the run was trained with (default: the run's own
    ``--tokenizer_file`` if that file is here, else tiktoken's gpt2). ``repo_id`` only fills the
    loading snippet of the model card (default: the export folder's path).
    """
    from hf_gpt2_train.data.tokenizer import get_encoding
    from hf_gpt2_train.hub.card import collect_run_record, render_model_card
    from hf_gpt2_train.hub.loss_plot import plot_loss_curve
    from hf_gpt2_train.hub.tokenizer import save_hf_tokenizer
    from hf_gpt2_train.model import load_trained_model, to_hf_state_dict

    checkpoint, out_dir = _valid(Path(checkpoint)), Path(out_dir)
    _check_out_dir(out_dir, checkpoint)
    rec = collect_run_record(checkpoint)
    if not tokenizer_file:
        run_tok = (rec.config.get("data") or {}).get("tokenizer_file") or ""
        tokenizer_file = run_tok if run_tok and Path(run_tok).exists() else ""
    model, mcfg = load_trained_model(str(checkpoint))
    n_vocab = get_encoding(tokenizer_file).n_vocab
    if n_vocab != mcfg.vocab_size:
        raise ConfigError(f"the tokenizer has {n_vocab} ids but the model was trained with vocab_size "
                          f"{mcfg.vocab_size}: pass the --tokenizer_file the run used")
    hf_model = _build_hf_model(to_hf_state_dict(model.state_dict(), mcfg), mcfg)
    del model
    n_params = sum(p.numel() for p in hf_model.parameters())  # tied wte/lm_head counted once

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.export-old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(str(tmp))
        save_hf_tokenizer(tmp, tokenizer_file, model_max_length=mcfg.n_positions)
        has_curve = plot_loss_curve(rec, tmp / "loss_curve.png")
        repo_ref = repo_id or str(out_dir)
        card = render_model_card(rec, repo_ref=repo_ref, license=license, n_params=n_params, has_curve=has_curve,
                                 title=repo_id.split("/")[-1] if repo_id else "")
        (tmp / "README.md").write_text(redact_secrets(card), encoding="utf-8")
        _finish_files(tmp)
        if out_dir.exists():  # an earlier export (checked above) or an empty folder: swap, then delete it
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)  # the rename itself is durable
    except OSError as e:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the swap failed half way: put the earlier export back
        raise ConfigError(f"could not write the export to {out_dir} ({e.strerror or e}): free disk space or "
                          "choose another --out; the checkpoint is untouched") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


