"""Pushing to the Hub, against a local stand-in for the Hub's HTTP API (the only thing stood in).

The stand-in implements what huggingface_hub's create_repo + upload_folder/create_commit call: ``POST
/api/repos/create``, ``POST /api/validate-yaml`` (the card's metadata), ``POST /api/models/{repo}/preupload/{rev}`` (answering "regular" upload mode, so
file contents travel base64-encoded inside the commit instead of through LFS/xet storage) and ``POST
/api/models/{repo}/commit/{rev}`` (NDJSON); and what snapshot_download calls: ``GET
/api/models/{repo}/revision/{rev}``, ``GET /api/models/{repo}/tree/{rev}`` and ``HEAD``/``GET
/{repo}/resolve/{rev}/{path}``. Anything else is recorded and answered 404, so a test sees every request the
client made. ``delay_s`` makes every answer slow; ``down(method)`` returning True answers that request 503.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

TOKEN = "hf_test_write_token"
EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt", "README.md", "loss_curve.png"}
# The run the export and push tests share (tests/test_export.py uses it too).
TRAIN_STEPS = 12
EVAL_STEPS = 6  # evaluations at 6 and 12: `best` and `final` are both real tiers
BATCH_TOKENS = 1024  # the quickstart model on 8 x 128-token batches: small enough for a shared 2-core CI box
RUN_REPO = "carol/quickstart-run"


@dataclass
class FakeHub:
    """State of the stand-in: repositories, their files, and every request seen."""

    url: str = ""
    repos: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, auth header)
    unexpected: list[str] = field(default_factory=list)
    validated: list[dict] = field(default_factory=list)  # README metadata blocks the client had checked
    commits: list[tuple[float, str, list[str]]] = field(default_factory=list)  # (time, message, paths)
    history: list[dict[str, bytes]] = field(default_factory=list)  # the repo's files after each commit
    delay_s: float = 0.0  # every answer waits this long (a slow Hub)
    down: Callable[[str], bool] | None = None  # down(method) True: that request gets 503 (a Hub that is down)

    def sha(self, repo: str) -> str:
        return hashlib.sha1(f"{repo}:{len(self.commits)}".encode()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _unavailable(self) -> bool:
            time.sleep(hub.delay_s)
            if hub.down is not None and hub.down(self.command):
                self._reply(503, {"error": "Service Unavailable (the stand-in is down)"})
                return True
            return False

        def _file(self, head: bool) -> None:
            """``/{repo}/resolve/{rev}/{path}``: a file's bytes with the headers hf_hub_download needs."""
            parts = self.path.split("?")[0].strip("/").split("/")
            repo, rel = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
            data = hub.files.get(repo, {}).get(rel)
            if data is None:
                self._reply(404, {"error": "Entry not found"})
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", hub.sha(repo))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path, self.headers.get("authorization")))
            if self._unavailable():
                return
            if "/resolve/" in self.path:
                self._file(head=True)
            else:
                hub.unexpected.append(f"HEAD {self.path}")
                self._reply(404, {"error": "not implemented by the stand-in"})

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path, self.headers.get("authorization")))
            if self.path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: none known here
                self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                return
            if self._unavailable():
                return
            parts = self.path.split("?")[0].strip("/").split("/")
            if "/resolve/" in self.path:
                self._file(head=False)
            elif len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in hub.files:
                    self._reply(404, {"error": "Repository not found"})
                elif parts[4] == "revision":
                    self._reply(200, {"id": repo, "sha": hub.sha(repo), "private": False,
                                      "siblings": [{"rfilename": f} for f in sorted(hub.files[repo])]})
                else:  # a recursive listing (one page)
                    self._reply(200, [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                      for f, d in sorted(hub.files[repo].items())])
            else:
                hub.unexpected.append(f"GET {self.path}")
                self._reply(404, {"error": "not implemented by the stand-in"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            auth = self.headers.get("authorization")
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path, auth))
            if self._unavailable():
                return
            if auth != f"Bearer {TOKEN}":
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
                return
            parts = path.strip("/").split("/")
            if path == "/api/validate-yaml":  # the client checks a README's metadata before uploading
                content = json.loads(body)["content"]
                meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
                if not isinstance(meta, dict):
                    self._reply(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
                else:
                    hub.validated.append(meta)
                    self._reply(200, {"errors": [], "warnings": []})
            elif path == "/api/repos/create":
                d = json.loads(body)
                repo = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
                if repo in hub.repos:
                    self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    return
                hub.repos[repo] = d
                hub.files[repo] = {}
                self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
            elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in hub.repos:
                    self._reply(404, {"error": "Repository not found"})
                    return
                files = json.loads(body)["files"]
                self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                             "oid": None} for f in files]})
            elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                repo = f"{parts[2]}/{parts[3]}"
                message, paths = "", []
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        v = item["value"]
                        assert v["encoding"] == "base64"
                        hub.files[repo][v["path"]] = base64.b64decode(v["content"])
                        paths.append(v["path"])
                    elif item["key"] == "header":
                        message = item["value"].get("summary", "")
                    else:
                        hub.unexpected.append(f"commit item {item['key']}")
                hub.commits.append((time.time(), message, paths))
                hub.history.append(dict(hub.files[repo]))
                self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40,
                                  "pullRequestUrl": None})
            else:
                hub.unexpected.append(f"POST {path}")
                self._reply(404, {"error": "not implemented by the stand-in"})

    return Handler


def start_fake_hub() -> tuple[FakeHub, ThreadingHTTPServer]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server


_session: dict[str, FakeHub] = {}


def make_trained_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """OUTPUT_DIR of a real quickstart run (CLI, CPU), trained once per session with ``--push_to_hub``
    to a Hub stand-in that lives for the session (``_session["hub"]``)."""
    out = tmp_path_factory.getbasetemp() / "hub_quickstart_run"
    if "hub" in _session:
        return out
    hub, _server = start_fake_hub()  # a daemon thread: serves until the session ends
    env = hub_env(hub.url, tmp_path_factory.mktemp("hf_home"), token=TOKEN)
    run_cli("train", "--preset", "quickstart", "--output_dir", str(out), "--max_steps", str(TRAIN_STEPS),
            "--eval_steps", str(EVAL_STEPS), "--checkpoint_steps", str(EVAL_STEPS), "--logging_steps", "2",
            "--warmup_steps", "2", "--total_batch_size", str(BATCH_TOKENS), "--per_device_train_batch_size", "8",
            "--n_embd", "128", "--seq_len", "128",  # pinned: the export tests check these shapes
            "--val_batches", "2", "--hellaswag_path", str(shared_data / "hellaswag_val.jsonl"),
            "--hellaswag_limit", "8", "--report_to", "none", "--push_to_hub", "--hub_model_id", RUN_REPO,
            env=_clean_env(env), check=True)
    _session["hub"] = hub
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return make_trained_run(tmp_path_factory, shared_data)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub, server = start_fake_hub()
    yield hub
    server.shutdown()
    server.server_close()


def hub_env(hub_url: str, home: Path, token: str | None = None) -> dict[str, str]:
    """Environment of a user with no saved login (empty HF_HOME), online, talking to ``hub_url``."""
    env = {"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env["HF_TOKEN"] = token or ""
    return env


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(extra)
    if not env["HF_TOKEN"]:
        del env["HF_TOKEN"]
    return env


def push(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`hf-gpt2-train push ARGS` as a user runs it, in exactly the environment ``env`` describes."""
    return subprocess.run([sys.executable, "-m", "hf_gpt2_train", "push", *args], capture_output=True, text=True,
                          env=_clean_env(env), timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [x for x in proc.stderr.strip().splitlines() if x.startswith("hf-gpt2-train: error:")]
    assert len(err) == 1, proc.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_training_with_push_to_hub_uploads_its_final_export(trained_run: Path) -> None:
    hub = _session["hub"]
    export_dir = trained_run / "hf_export" / "final"
    on_disk = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    assert set(on_disk) == EXPORT_FILES
    assert hub.files[RUN_REPO] == on_disk  # the export, and no checkpoint, optimizer or log file
    assert not hub.unexpected and hub.repos[RUN_REPO].get("visibility") != "private"
    assert hub.validated and hub.validated[0]["license"] == "mit"
    assert all(auth == f"Bearer {TOKEN}" for method, _, auth in hub.requests if method == "POST")
    card = on_disk["README.md"].decode()
    assert f'from_pretrained("{RUN_REPO}")' in card and f"`final` at optimizer step {TRAIN_STEPS} " in card


def test_failed_push_after_training_is_reported_and_never_touches_checkpoints(trained_run: Path,
                                                                              tmp_path: Path) -> None:
    from hf_gpt2_train.checkpoint import verify
    from hf_gpt2_train.config import Config
    from hf_gpt2_train.hub import export_and_push_after_training

    run = tmp_path / "run"  # the run's files (checkpoint hard-linked): this test adds its own export there
    shutil.copytree(trained_run / "checkpoints" / "final", run / "checkpoints" / "final", copy_function=os.link)
    for name in ("run_info.json", "metrics.jsonl"):
        shutil.copy(trained_run / name, run / name)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    cfg = Config.from_dict(json.loads((run / "run_info.json").read_text())["config"])
    cfg.hub.push_to_hub, cfg.hub.hub_model_id = True, "carol/x"
    # This process runs with HF_HUB_OFFLINE=1 (conftest): the push cannot happen, and says why.
    result = export_and_push_after_training(run, cfg)
    assert not result.ok and result.url is None
    assert "HF_HUB_OFFLINE" in result.error and f"hf-gpt2-train push {run / 'hf_export' / 'final'}" in result.error
    assert {p.name for p in (run / "hf_export" / "final").iterdir()} == EXPORT_FILES  # kept for the retry
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before
    assert verify(run / "checkpoints" / "final", hashes=True).ok


def test_push_uploads_exactly_the_export(trained_run, fake_hub: FakeHub, tmp_path: Path) -> None:
    out_dir = trained_run
    export_dir = tmp_path / "export"
    env = hub_env(fake_hub.url, tmp_path / "hf_home", token=TOKEN)  # token from HF_TOKEN
    proc = push("final", "--output_dir", str(out_dir), "--out", str(export_dir), "--hub_model_id",
                "alice/tiny-gpt2", "--hub_private", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{fake_hub.url}/alice/tiny-gpt2" in proc.stdout

    assert fake_hub.repos["alice/tiny-gpt2"]["visibility"] == "private"
    on_disk = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    assert set(on_disk) == EXPORT_FILES
    assert fake_hub.files["alice/tiny-gpt2"] == on_disk  # every export file, byte for byte, and nothing else
    assert not fake_hub.unexpected
    assert all(auth == f"Bearer {TOKEN}" for m, _, auth in fake_hub.requests if m == "POST")

    # What the Hub received is a complete model: transformers loads it from a copy of the uploaded files.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    received = tmp_path / "received"
    received.mkdir()
    for name, data in fake_hub.files["alice/tiny-gpt2"].items():
        (received / name).write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(str(received))
    tok = AutoTokenizer.from_pretrained(str(received))
    assert model.config.vocab_size == len(tok) == 50257
    assert 'model="alice/tiny-gpt2"' in (received / "README.md").read_text()

    # Pushing the export folder again (a retry) reuses the existing repository: create_repo(exist_ok=True).
    n_before = len(fake_hub.requests)
    proc = push(str(export_dir), "--hub_model_id", "alice/tiny-gpt2", "--hub_token", TOKEN,
                env=hub_env(fake_hub.url, tmp_path / "hf_home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p for m, p, _ in fake_hub.requests[n_before:] if m == "POST"][0] == "/api/repos/create"
    assert fake_hub.files["alice/tiny-gpt2"] == on_disk and not fake_hub.unexpected


def test_push_without_token_names_the_fix_and_keeps_the_export(trained_run, fake_hub: FakeHub,
                                                               tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    proc = push(str(trained_run / "checkpoints" / "final"), "--out", str(export_dir), "--hub_model_id", "alice/x",
                env=hub_env(fake_hub.url, tmp_path / "empty_hf_home"))
    assert_one_line_error(proc, "no Hugging Face token", "--hub_token", "HF_TOKEN", "hf auth login", str(export_dir))
    assert fake_hub.requests == []  # nothing was sent
    assert {p.name for p in export_dir.iterdir()} == EXPORT_FILES  # the export is kept for the retry

    # The retry the message suggests works once a token is there.
    proc = push(str(export_dir), "--hub_model_id", "alice/x", env=hub_env(fake_hub.url, tmp_path / "h", TOKEN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(fake_hub.files["alice/x"]) == EXPORT_FILES


def test_push_with_rejected_token_or_no_network(trained_run, fake_hub: FakeHub, tmp_path: Path) -> None:
    export_dir = tmp_path / "export"  # the run's own export, as --push_to_hub left it
    shutil.copytree(trained_run / "hf_export" / "final", export_dir)
    proc = push(str(export_dir), "--hub_model_id", "alice/x", "--hub_token", "hf_wrong",
                env=hub_env(fake_hub.url, tmp_path / "h"))
    assert_one_line_error(proc, "rejected the token", "--hub_token", str(export_dir))
    assert fake_hub.files == {}
    assert {p.name for p in export_dir.iterdir()} == EXPORT_FILES

    with socket.socket() as s:  # a port nothing listens on: connection refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = push(str(export_dir), "--hub_model_id", "alice/x", env=hub_env(dead, tmp_path / "h", TOKEN))
    assert_one_line_error(proc, "cannot reach the Hub", dead, str(export_dir))
    assert {p.name for p in export_dir.iterdir()} == EXPORT_FILES

    proc = push(str(export_dir), "--hub_model_id", "not a repo id!", env=hub_env(fake_hub.url, tmp_path / "h", TOKEN))
    assert_one_line_error(proc, "--hub_model_id", "USER/NAME")

