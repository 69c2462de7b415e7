"""`export`: a real quickstart run's checkpoint becomes a folder transformers loads offline, with the
same logits, GPT-2's tokenizer, and a model card filled from the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hf_gpt2_train.cli import main as cli_main
from tests.conftest import run_cli
from tests.test_hub_push import BATCH_TOKENS, EVAL_STEPS, EXPORT_FILES, TRAIN_STEPS, make_trained_run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return make_trained_run(tmp_path_factory, shared_data)


@pytest.fixture(scope="session")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-gpt2"
    proc = run_cli("export", "final", "--output_dir", str(trained_run), "--out", str(out), check=True)
    assert str(out) in proc.stdout
    return out


def _cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the CLI in-process (bad-input checks need no model): exit code and stderr."""
    with pytest.raises(SystemExit) as e:
        cli_main(list(args))
    return int(e.value.code or 0), capsys.readouterr().err


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_export_loads_offline_in_transformers_and_generates(exported: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: nothing may come from the network
    assert {p.name for p in exported.iterdir()} == EXPORT_FILES
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    tok = AutoTokenizer.from_pretrained(str(exported))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.vocab_size == len(tok) == 50257
    assert tok.model_max_length == model.config.n_positions == 128
    assert model.generation_config.eos_token_id == tok.eos_token_id == 50256

    # Stock HF GPT-2 layout: exactly the tensors (names and Conv1D [in, out] shapes) GPT2LMHeadModel saves.
    reference = GPT2LMHeadModel(GPT2Config.from_pretrained(str(exported)))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: v for k, v in saved.items() if k != "lm_head.weight"} == expected
    assert saved["transformer.h.0.attn.c_attn.weight"] == (128, 384)  # Conv1D: [n_embd, 3 * n_embd]

    gen = pipeline("text-generation", model=str(exported))
    prompt = "ROMEO:"
    text = gen(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(tok(text)["input_ids"]) > len(tok(prompt)["input_ids"])


def test_exported_logits_equal_the_training_model(exported: Path, trained_run: Path, shared_data: Path) -> None:
    from transformers import AutoModelForCausalLM

    from hf_gpt2_train.data.tokenizer import get_encoding
    from hf_gpt2_train.model import lm_logits, load_trained_model

    train_model, mcfg = load_trained_model(str(trained_run / "checkpoints" / "final"))
    assert mcfg.padded_vocab_size == 50304  # the training model really has padded rows to trim
    hf_model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = get_encoding().encode_ordinary((shared_data / "tinyshakespeare.txt").read_text()[5000:9000])
    x = torch.tensor([ids[:128], ids[200:328]])
    with torch.no_grad():
        ref = lm_logits(train_model, x, 50257)
        out = hf_model(input_ids=x).logits
    assert out.shape == ref.shape == (2, 128, 50257)
    assert (out - ref).abs().max().item() <= 1e-5
    # A trained model, not an initial one: these tokens are predicted far better than uniform (ln 50257 = 10.8).
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 50257), x[:, 1:].reshape(-1))
    assert loss.item() < 9.0


# OpenAI's own gpt2 config.json (huggingface.co/openai-community/gpt2/blob/main/config.json), verbatim.
OPENAI_GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
    "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
# What llama.cpp's convert_hf_to_gguf.py (GPT2Model.set_gguf_parameters) reads from config.json.
LLAMA_CPP_GPT2_KEYS = ("n_layer", "n_ctx", "n_embd", "n_head", "layer_norm_epsilon")


def test_exported_config_has_every_key_of_openais_gpt2_config(exported: Path, tmp_path: Path) -> None:
    from hf_gpt2_train.config import ModelConfig
    from hf_gpt2_train.hub.export import export_config

    cfg = json.loads((exported / "config.json").read_text())
    missing = sorted(set(OPENAI_GPT2_CONFIG) - set(cfg))
    assert not missing, missing
    assert all(k in cfg for k in LLAMA_CPP_GPT2_KEYS)
    assert cfg["n_ctx"] == cfg["n_positions"] == 128  # this export's own shape
    # GPT-2 124M's shape (and its 0.1 dropout) gives exactly OpenAI's values, as saved by save_pretrained
    export_config(ModelConfig(dropout=0.1)).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in OPENAI_GPT2_CONFIG} == OPENAI_GPT2_CONFIG


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_is_filled_from_the_run(exported: Path, trained_run: Path) -> None:
    import matplotlib.image
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = (exported / "README.md").read_text()
    meta, body = _front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert "hf-gpt2-train" in meta["tags"] and meta["pipeline_tag"] == "text-generation"

    manifest = json.loads((trained_run / "checkpoints" / "final" / "manifest.json").read_text())
    run_info = json.loads((trained_run / "run_info.json").read_text())
    evals = [m for m in _metrics(trained_run) if "eval/val_loss" in m]
    assert [m["step"] for m in evals] == [EVAL_STEPS, TRAIN_STEPS]
    assert manifest["step"] == TRAIN_STEPS
    assert f"validation loss (nats/token, held-out split of the training data) | {evals[-1]['eval/val_loss']:.4f} (at step {TRAIN_STEPS})" in body
    assert f"HellaSwag acc_norm (completion-style, 0-shot) | {evals[-1]['eval/hellaswag_acc_norm']:.4f} (8 " in body
    assert f"HellaSwag acc | {evals[-1]['eval/hellaswag_acc']:.4f} |" in body
    assert "| preset | `quickstart` |" in body
    assert f"`final` at optimizer step {TRAIN_STEPS} of {TRAIN_STEPS}" in body
    assert f"| tokens seen | {manifest['tokens_seen']:,} |" in body and manifest["tokens_seen"] == TRAIN_STEPS * BATCH_TOKENS
    assert "| precision requested | fp32 |" in body and "| precision in effect | fp32 |" in body
    assert ": no " not in card and "| no |" not in card  # Accelerate's "no" never reaches the reader
    assert f"| hardware | CPU: {run_info['device']}, 1 process |" in body and run_info["device"] not in ("", "cpu")
    assert "| |" not in body and "|  |" not in body  # no empty header or cells (they render as grey bars)
    # the data is named from its manifest (the embedded pydoc corpus), here and in Limitations
    assert "pydoc" in body.split("## How to use")[0] and "pydoc" in body.split("## Limitations")[1]
    assert "web/book text" not in body
    # model-index in the Hub's schema, read back with huggingface_hub's own parser: the run's values
    name, results = model_index_to_eval_results(meta["model-index"])
    got = {(r.dataset_type, r.metric_type): r for r in results}
    assert got[("pydoc-help-topics", "loss")].metric_value == pytest.approx(evals[-1]["eval/val_loss"], abs=1e-4)
    assert got[("Rowan/hellaswag", "acc_norm")].metric_value == pytest.approx(evals[-1]["eval/hellaswag_acc_norm"],
                                                                              abs=1e-4)
    assert got[("Rowan/hellaswag", "acc")].metric_value == pytest.approx(evals[-1]["eval/hellaswag_acc"], abs=1e-4)
    assert got[("Rowan/hellaswag", "acc")].dataset_args == {"num_few_shot": 0, "num_examples": 8}
    assert all(r.task_type == "text-generation" for r in results) and len(results) == 3
    assert f"| processes (world size) | {run_info['world_size']} |" in body
    assert f'AutoModelForCausalLM.from_pretrained("{exported}")' in body
    assert "![Training loss (smoothed) and validation loss by optimizer step](loss_curve.png)" in body
    assert "`mit` license" in body

    png = exported / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[0] >= 300 and img.shape[1] >= 500 and img.std() > 0.05  # a drawn chart, not a blank


def test_tier_forms_resolve_to_the_same_checkpoint(trained_run: Path) -> None:
    from hf_gpt2_train.hub import resolve_checkpoint

    ck = trained_run / "checkpoints"
    assert resolve_checkpoint("best", output_dir=str(trained_run)) == ck / "best"
    assert resolve_checkpoint(str(ck / "best")) == ck / "best"
    assert resolve_checkpoint(str(trained_run), tier="best") == ck / "best"
    assert resolve_checkpoint(str(trained_run)) == ck / "final"  # an output dir means its final model
    assert resolve_checkpoint("backup", output_dir=str(trained_run)) == ck / "latest_backup"


def test_bad_input_is_one_line_exit_2_and_changes_nothing(trained_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["export", "best", "--out", str(tmp_path / "a")], "add --output_dir OUTPUT_DIR"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "does not exist"),
        (["export", str(trained_run), "--tier", "step_9999999", "--out", str(tmp_path / "a")], "does not exist"),
        (["export", "final", "--output_dir", str(trained_run), "--out",
          str(trained_run / "checkpoints" / "final" / "x")], "overlaps the checkpoint"),
    ]
    for args, needle in cases:
        code, err = _cli(*args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "a").exists()

    # A damaged checkpoint (weights truncated) is refused, not exported.
    bad = tmp_path / "damaged"
    shutil.copytree(trained_run / "checkpoints" / "final", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    code, err = _cli("export", str(bad), "--out", str(tmp_path / "b"), capsys=capsys)
    assert code == 2 and "not a complete checkpoint" in err and "latest_backup" in err, err
    assert not (tmp_path / "b").exists()

    # A folder that is not an export is never overwritten.
    mine = tmp_path / "my_stuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = _cli("export", "final", "--output_dir", str(trained_run), "--out", str(mine), capsys=capsys)
    assert code == 2 and "not an hf-gpt2-train export" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_reexport_replaces_atomically_even_when_killed(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    run_cli("export", str(trained_run), "--tier", "best", "--out", str(out), check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "`best` at optimizer step" in before["README.md"].decode()

    # kill -9 in the middle of a re-export: the earlier export stays whole under its name.
    proc = subprocess.Popen([sys.executable, "-m", "hf_gpt2_train", "export", "final", "--output_dir",
                             str(trained_run), "--out", str(out), "--license", "apache-2.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not list(tmp_path.glob(".exp.export-tmp-*/tokenizer.json")):
        time.sleep(0.01)
    assert proc.poll() is None, f"the export ended before the kill: {proc.stdout.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert list(tmp_path.glob(".exp.export-tmp-*/tokenizer.json")), "the kill did not land during the export"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The next export cleans up what the killed one left and replaces the export in one rename.
    run_cli("export", "final", "--output_dir", str(trained_run), "--out", str(out), "--license", "apache-2.0",
            check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and f"`final` at optimizer step {TRAIN_STEPS}" in card


def test_export_of_an_fp8_run_is_plain_gpt2(tmp_path: Path, shared_data: Path) -> None:
    """An fp8 run (torchao, emulated on CPU) exports stock weights: no Float8Linear, no fp8 state."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    run = tmp_path / "fp8run"
    run_cli("train", "--preset", "quickstart", "--output_dir", str(run), "--max_steps", "2",
            "--total_batch_size", "1024", "--per_device_train_batch_size", "8", "--val_batches", "1",
            "--no_hellaswag", "--sample_max_new_tokens", "2", "--report_to", "none",
            "--mixed_precision", "fp8", "--fp8_emulate", "--fp8_min_dim", "16", check=True)
    run_info = json.loads((run / "run_info.json").read_text())
    assert run_info["effective_precision"].startswith("fp8") and run_info["fp8_block_coverage"] >= 0.9

    out = tmp_path / "fp8export"
    run_cli("export", str(run), "--out", str(out), check=True)
    reference = GPT2LMHeadModel(GPT2Config.from_pretrained(str(out)))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert keys | {"lm_head.weight"} == set(reference.state_dict()) | {"lm_head.weight"}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    out_ids = model.generate(torch.tensor([[50256]]), min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 5)
    body = (out / "README.md").read_text()
    assert f"| precision in effect | fp8 (ao emulated, coverage {run_info['fp8_coverage']:.0%})" in body, body
