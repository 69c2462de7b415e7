"""Config: presets, YAML, CLI precedence, aliases, --help from docstrings, accelerate profiles, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from hf_gpt2_train.cli import build_parser, config_from_args
from hf_gpt2_train.config import PRESETS, Config, ConfigError, build_config
from tests.conftest import REPO, run_cli


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_validates(name):
    cfg = build_config(preset=name)
    cfg.validate(world_size=1)
    assert cfg.grad_accum_steps(1) >= 1


def test_gpt2_presets_have_gpt2_dimensions_and_nanogpt_recipe():
    dims = {n: (build_config(n).model.n_layer, build_config(n).model.n_head, build_config(n).model.n_embd)
            for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert dims == {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                    "gpt2-xl": (48, 25, 1600)}
    o = build_config("gpt2").optim
    assert (o.total_batch_size, o.learning_rate, o.warmup_steps, o.max_steps) == (524288, 6e-4, 715, 19073)
    assert (o.min_lr_ratio, o.weight_decay, o.adam_beta1, o.adam_beta2, o.max_grad_norm) == (0.1, 0.1, 0.9, 0.95, 1.0)
    assert build_config("gpt2").model.padded_vocab_size == 50304


def test_precedence_preset_then_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: quickstart\noptim:\n  learning_rate: 1.0e-3\n  max_steps: 7\nseed: 5\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--max_steps", "9", "--output_dir", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.preset == "quickstart" and cfg.model.n_embd == 64  # from the preset named in YAML
    assert cfg.optim.learning_rate == 1e-3 and cfg.run.seed == 5  # YAML (nested and flat keys)
    assert cfg.optim.max_steps == 9  # CLI wins


def test_aliases_of_the_original_system(tmp_path):
    args = build_parser().parse_args(["train", "--preset", "quickstart", "--checkpoint_freq", "7", "--eval_freq", "3",
                                      "--use_tensorboard", "--use_fp8", "--resume", "latest", "--no_compile"])
    cfg = config_from_args(args)
    assert cfg.checkpoint.checkpoint_steps == 7 and cfg.eval.eval_steps == 3
    assert cfg.tracking.report_to == "tensorboard" and cfg.precision.mixed_precision == "fp8"
    assert cfg.checkpoint.resume_from_checkpoint == "latest" and cfg.run.compile is False


def test_auto_picks_the_run_time_default_of_optional_switches(tmp_path, capsys):
    """--async_checkpoint and --compile default to a choice made at run time (None); 'auto' asks for it explicitly
    (e.g. to undo a YAML file's true/false); true/false still parse, anything else is named."""
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["train", "--preset", "quickstart", "--async_checkpoint", "auto", "--compile", "AUTO"]))
    assert cfg.checkpoint.async_checkpoint is None and cfg.run.compile is None
    cfg = config_from_args(parse(["train", "--preset", "quickstart", "--async_checkpoint", "true", "--compile", "off"]))
    assert cfg.checkpoint.async_checkpoint is True and cfg.run.compile is False
    for flag, value in (("--async_checkpoint", "sometimes"), ("--hellaswag", "auto")):  # a plain bool has no auto
        with pytest.raises(SystemExit) as e:
            parse(["train", "--preset", "quickstart", flag, value])
        assert e.value.code == 2 and f"argument {flag}: expected true/false, got '{value}'" in capsys.readouterr().err
    y = tmp_path / "c.yaml"  # the same choice from a YAML file (and a config read back from run_info.json: null)
    y.write_text("checkpoint:\n  async_checkpoint: auto\n  resume_from_checkpoint: auto\nrun:\n  compile: null\n")
    cfg = build_config(yaml_path=str(y), cli={"padded_logits": "auto"})
    assert cfg.checkpoint.async_checkpoint is None and cfg.run.compile is None and cfg.run.padded_logits is None
    assert cfg.checkpoint.resume_from_checkpoint == "auto"  # a string option's 'auto' is a value, not a default


def test_unknown_yaml_keys_rejected_all_at_once(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  learning_rat: 1\n  max_steps: abc\nbogus: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config(yaml_path=str(y))
    msg = str(e.value)
    assert "optim.learning_rat" in msg and "'bogus'" in msg and "max_steps='abc'" in msg


def test_validation_reports_every_problem():
    cfg = build_config("quickstart", cli={"seq_len": 4096, "total_batch_size": 1000, "on_nonfinite": "explode"})
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=1)
    msg = str(e.value)
    assert "seq_len 4096 exceeds" in msg and "total_batch_size 1000" in msg and "on_nonfinite" in msg


def test_saved_config_round_trips():
    cfg = build_config("gpt2-medium", cli={"max_steps": 11, "sample_prompts": ["a", "b"]})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_help_comes_from_field_docstrings():
    out = run_cli("train", "--help", check=True).stdout
    assert "Tokens per optimizer step across all processes" in out
    assert "--per_device_train_batch_size" in out and "--resume_from_checkpoint" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--preset", "gpt3"], "unknown preset 'gpt3'"),
    (["train", "--preset", "quickstart", "--seq_len", "4096"], "exceeds the model's context"),
    (["train", "--preset", "quickstart", "--total_batch_size", "1000"], "no micro-batch size fits"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, argv, needle):
    proc = run_cli(*argv, "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_malformed_yaml_is_one_line_exit_2(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("optim: [unclosed\n")
    proc = run_cli("train", "--config", str(y), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_profiles_load_with_accelerates_own_loader(path: Path):
    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.num_processes >= 1
