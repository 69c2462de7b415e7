"""The paths users take first: any number of processes, a Hub token, bad output dirs, a fast CLI, durable writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_gpt2_train.cli import main as cli_main
from hf_gpt2_train.config import Config, ConfigError, build_config
from tests.conftest import REPO, free_port, run_cli

ONE_STEP = ["--preset", "quickstart", "--max_steps", "1", "--report_to", "none"]  # fails before training anyway


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    err = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("hf-gpt2-train: error: "), proc.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------------------------- micro-batch fit
@pytest.mark.parametrize("preset,world,micro", [
    ("quickstart", 1, 16), ("quickstart", 2, 8), ("quickstart", 4, 4), ("quickstart", 16, 1),
    ("gpt2", 8, 64), ("gpt2", 16, 32), ("gpt2", 64, 8), ("gpt2-xl", 8, 8), ("gpt2-xl", 128, 4),
])
def test_micro_batch_is_the_largest_that_fits_the_world_size(preset: str, world: int, micro: int) -> None:
    cfg = build_config(preset)
    requested, total = cfg.optim.per_device_train_batch_size, cfg.optim.total_batch_size
    note = cfg.fit_micro_batch(world)
    assert cfg.optim.per_device_train_batch_size == micro
    assert (note is None) == (micro == requested)
    if note:
        assert f"per_device_train_batch_size {requested} -> {micro}" in note
    cfg.validate(world_size=world)
    assert cfg.grad_accum_steps(world) * micro * cfg.optim.seq_len * world == total  # the recipe is unchanged


def test_a_batch_no_micro_batch_fits_is_one_problem() -> None:
    cfg = build_config("quickstart", cli={"total_batch_size": 1536})  # 1536 = 2 x 768 tokens
    assert cfg.fit_micro_batch(3) is not None and cfg.optim.per_device_train_batch_size == 8  # 8*64*3 = 1536
    cfg = build_config("gpt2")
    assert cfg.fit_micro_batch(3) is None  # 524288 is not a multiple of 1024*3: no micro-batch can fit
    with pytest.raises(ConfigError, match="no micro-batch size fits: use a multiple of 3072") as e:
        cfg.validate(world_size=3)
    assert e.value.every_process  # the same on every rank: printed by the main process only


@pytest.mark.slow
def test_impossible_batch_under_torchrun_is_printed_once(tmp_path: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "hf_gpt2_train", "train", *ONE_STEP, "--total_batch_size", "1000",
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    ours = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("hf-gpt2-train: error:")]
    assert len(ours) == 1 and "no micro-batch size fits" in ours[0], proc.stderr[-3000:]
    assert "hf_gpt2_train/" not in proc.stderr  # torchrun reports the exit codes; no frame of ours
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- output dirs
def test_output_dir_that_is_a_file_is_refused_untouched(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("my notes\n")
    _one_error_line(run_cli("train", *ONE_STEP, "--output_dir", str(f)), f"--output_dir {f} is a file")
    assert f.read_text() == "my notes\n"


@pytest.mark.parametrize("path", ["/proc/hf-gpt2-train-test/run", "{file}/run"])
def test_output_dir_that_cannot_be_created_is_refused(tmp_path: Path, path: str) -> None:
    (tmp_path / "a_file").write_text("x")
    out = path.format(file=tmp_path / "a_file")
    _one_error_line(run_cli("train", *ONE_STEP, "--output_dir", out), f"--output_dir {out} cannot be created",
                    "choose a writable --output_dir")
    assert not Path(out).exists() and (tmp_path / "a_file").read_text() == "x"


def _can_mount_read_only() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs root and mount namespaces (unshare -m)")
def test_read_only_output_dir_is_refused(tmp_path: Path) -> None:
    """A folder that really is read-only: a read-only tmpfs mounted over it in a private mount namespace (the
    mount vanishes with the command). chmod would not do: root writes through permission bits, and chattr +i
    is not supported on every filesystem (tmpfs, overlayfs)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m hf_gpt2_train train "
              f"{' '.join(ONE_STEP)} --output_dir {ro}/run")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    _one_error_line(proc, f"--output_dir {ro}/run is on a read-only filesystem", "choose a writable --output_dir")
    assert list(ro.iterdir()) == []


# -------------------------------------------------------------------------------- prefix-free messages
def test_error_messages_name_their_source_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    y = tmp_path / "type.yaml"
    y.write_text("optim:\n  max_steps: ten\n  seq_len: null\n")
    with pytest.raises(ConfigError) as e:
        build_config(yaml_path=str(y))
    msg = str(e.value)
    assert msg.startswith(f"{y}: ") and msg.count(str(y)) == 1, msg
    assert "max_steps='ten' is not a valid int" in msg and "seq_len may not be null" in msg

    with pytest.raises(SystemExit) as code:
        cli_main(["train", "--preset", "quickstart", "--max_steps", "ten", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.count("command line:") == 1, err
    assert err.startswith("hf-gpt2-train: error: command line: max_steps='ten' is not a valid int")


# ------------------------------------------------------------------------------------------ fast CLI
_IMPORT_PROBE = """
import atexit, json, os, sys
atexit.register(lambda: json.dump(sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules),
                                  open(os.environ["IMPORT_REPORT"], "w")))
sys.argv = ["hf-gpt2-train", *sys.argv[1:]]
from hf_gpt2_train.cli import main
main()
"""


def _seconds(argv: list[str], env: dict[str, str]) -> float:
    """Median wall time of 3 runs (the machine is shared: one slow run should not decide)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env, check=True, timeout=120)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_light_commands_import_neither_torch_nor_transformers_and_beat_import_torch(tmp_path: Path) -> None:
    from hf_gpt2_train.checkpoint.atomic import seal

    final = tmp_path / "run" / "checkpoints" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"\0" * 1024)
    seal(final, {"step": 3, "tokens_seen": 3072})
    data = tmp_path / "data"  # an llm.c shard: magic, version, 16 tokens
    data.mkdir()
    (data / "tiny_train.bin").write_bytes(struct.pack("<256i", 20240520, 1, 16, *[0] * 253) + bytes(32))
    commands = [["--help"], ["train", "--help"], ["presets"], ["checkpoints", "list", str(tmp_path / "run")],
                ["checkpoints", "verify", str(final)], ["data", "verify", str(data), "--checksums"]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    torch_s = _seconds([sys.executable, "-c", "import torch"], env)
    for args in commands:
        report = tmp_path / "imports.json"
        proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *args], capture_output=True, text=True,
                              env={**env, "IMPORT_REPORT": str(report)}, timeout=120)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert json.loads(report.read_text()) == [], (args, "imported heavy modules")
        cmd_s = _seconds([sys.executable, "-m", "hf_gpt2_train", *args], env)
        assert cmd_s < torch_s, (args, cmd_s, torch_s)


# -------------------------------------------------------------------------------------------- secrets
def test_redaction_covers_secret_keys_and_token_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_gpt2_train.redact import REDACTED, RedactingFilter, redact_secrets, register_secret

    monkeypatch.setenv("HF_TOKEN", "hf_envtoken_0123456789")
    register_secret("hf_clitoken_abcdefgh")
    doc = {"hub": {"hub_token": "hf_clitoken_abcdefgh", "hub_model_id": "a/b"}, "wandb_api_key": "k" * 40,
           "tokens_seen": 123, "eval": {"sample_max_new_tokens": 32}, "note": ["url?token=hf_envtoken_0123456789"]}
    clean = redact_secrets(doc)
    assert clean["hub"] == {"hub_token": REDACTED, "hub_model_id": "a/b"} and clean["wandb_api_key"] == REDACTED
    assert clean["tokens_seen"] == 123 and clean["eval"] == {"sample_max_new_tokens": 32}
    assert clean["note"] == [f"url?token={REDACTED}"]
    assert doc["hub"]["hub_token"] == "hf_clitoken_abcdefgh"  # a copy: the run still has its token

    record = logging.LogRecord("hf_gpt2_train", logging.ERROR, __file__, 1, "push failed with %s", ("hf_clitoken_abcdefgh",),
                               None)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"push failed with {REDACTED}"

    cfg = build_config("quickstart", cli={"hub_token": "hf_clitoken_abcdefgh"})
    saved = cfg.to_dict(redact=True)
    assert saved["hub"]["hub_token"] == REDACTED and cfg.hub.hub_token == "hf_clitoken_abcdefgh"
    assert Config.from_dict(saved).hub.hub_token == ""  # read back: not a usable token, so HF_TOKEN/login again


@pytest.mark.slow
def test_two_processes_with_every_default_push_to_hub_and_write_no_token(tmp_path: Path) -> None:
    """README's multi-process line with --preset quickstart as is (the micro-batch fits itself to 2 processes),
    the default trackers, and --push_to_hub to the loopback Hub stand-in. Exit 0, no traceback, and neither the
    --hub_token nor HF_TOKEN value appears in any file the run or its export wrote (binary files included)."""
    from tests.test_hub_push import EXPORT_FILES, TOKEN, start_fake_hub

    env_token = "hf_envsentinel_5f0c1e9d7b"  # in HF_TOKEN: the --hub_token wins, and neither may be written
    hub, server = start_fake_hub()
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_TOKEN=env_token)
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "hf_gpt2_train", "train", "--preset",
                               "quickstart", "--output_dir", str(out), "--max_steps", "8", "--eval_steps", "4",
                               "--checkpoint_steps", "4", "--push_to_hub", "--hub_model_id", "alice/ddp-run",
                               "--hub_token", TOKEN], capture_output=True, text=True, env=env, timeout=900)
    finally:
        server.shutdown()
        server.server_close()
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "Traceback" not in console, console[-4000:]
    assert console.count("visible to other users") == 1  # the --hub_token warning, once (main process)
    assert console.count("per_device_train_batch_size 16 -> 8") == 1
    assert TOKEN not in console and env_token not in console

    export = out / "hf_export" / "final"
    assert {p.name for p in export.iterdir()} == EXPORT_FILES
    assert hub.files["alice/ddp-run"] == {p.name: p.read_bytes() for p in export.iterdir()}
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard (the default) was on
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["config"]["hub"]["hub_token"] == "<redacted>"

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".safetensors" for p in files)
    for p in files:
        data = p.read_bytes()
        assert TOKEN.encode() not in data and env_token.encode() not in data, p
    for name, data in hub.files["alice/ddp-run"].items():
        assert TOKEN.encode() not in data and env_token.encode() not in data, name


_SLOW_UPLOAD = """
import json, sys, time
from datetime import timedelta
from types import SimpleNamespace
import torch.distributed as dist
import hf_gpt2_train.hub.push as push
from hf_gpt2_train.hub.end import push_at_end
from hf_gpt2_train.process_exit import leave

dist.init_process_group("gloo", timeout=timedelta(seconds=3))  # a training group with a short timeout
rank = dist.get_rank()

def upload_longer_than_the_group_timeout(output_dir, cfg):  # the Hub's servers cannot exist here: an 8 s upload
    time.sleep(8)
    return push.PushResult(export_dir=None, url="https://hub.example/x")

push.export_and_push_after_training = upload_longer_than_the_group_timeout
t0 = time.time()
ok = push_at_end(SimpleNamespace(num_processes=2, is_main_process=rank == 0), "unused", None)
waited = time.time() - t0
dist.barrier()  # the training group is still usable after the wait
dist.destroy_process_group()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"ok": ok, "waited": waited}, f)
leave(0)  # as the CLI ends a multi-process run: gloo can abort a worker in the interpreter's teardown
"""


@pytest.mark.slow
def test_other_ranks_outwait_an_upload_longer_than_the_training_group_timeout(tmp_path: Path) -> None:
    script = tmp_path / "slow_upload.py"
    script.write_text(_SLOW_UPLOAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["ok"] for r in ranks)
    assert ranks[1]["waited"] > 7  # rank 1 waited the whole upload, far past the group's 3 s timeout


# ------------------------------------------------------------------------------------ durable writes
def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    from hf_gpt2_train.fsio import atomic_writer, probe_writable_dir, write_json_atomic, write_text_atomic

    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    assert json.loads(target.read_text()) == {"step": 1}
    with pytest.raises(RuntimeError), atomic_writer(target, "w") as f:
        f.write('{"step": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"step": 1}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left behind
    write_text_atomic(target, "done\n")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "done\n" and target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    probe_writable_dir(tmp_path / "new" / "dir")
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe file is gone
    with pytest.raises(OSError):
        probe_writable_dir(target / "sub")
