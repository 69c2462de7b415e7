"""Shared fixtures: real data from ../shared, the CLI as a user runs it, and README's quickstart run once.

The suite takes the user's path: nothing fills tiktoken's cache (the vocabulary ships in the package) and
the quickstart fixture runs README's command as written, with a fresh HOME, no TIKTOKEN_*/HF_* variables,
no network (``unshare -n`` where possible) and a terminal (a pseudo-terminal, so the progress bar shows).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
README = REPO / "README.md"

# In-process tests and run_cli children never reach out to the Hub (the push tests point HF_ENDPOINT at a
# loopback stand-in and turn this off for their own subprocesses).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} missing: tests need ../shared/data"
    return SHARED_DATA


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m hf_gpt2_train ARGS` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hf_gpt2_train", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


# ------------------------------------------------------------------------------ a user's environment
_NOT_A_USERS = re.compile(r"^(TIKTOKEN_|DATA_GYM_|HF_|HUGGING_FACE_|TRANSFORMERS_|TOKENIZERS_|WANDB_|ACCELERATE_|"
                          r"PYTHONWARNINGS$|XDG_CACHE_HOME$|PYTEST_|TORCH_|OMP_NUM_THREADS$)")


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user on a fresh machine: a new empty HOME, none of the variables the tests or a
    developer may have set (TIKTOKEN_CACHE_DIR, HF_*, PYTHONWARNINGS...), the checkout on PYTHONPATH and the
    interpreter's folder first on PATH (where `pip install -e .` puts `hf-gpt2-train`)."""
    env = {k: v for k, v in os.environ.items() if not _NOT_A_USERS.match(k)}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), TERM=env.get("TERM") or "xterm",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", **extra)
    return env


def no_network_available() -> bool:
    """True when commands can be run with the network namespace cut off (root, unshare and ip present)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def offline(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run with no network: a new network namespace with only loopback (up, for torchrun
    and the Hub stand-in). Where that is impossible (not root, no unshare/ip, a sandbox that forbids new
    namespaces) ``argv`` runs as is: the suite still passes, but proves less about offline use."""
    if not no_network_available():
        return argv
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def run_in_terminal(argv: list[str], env: dict[str, str], cwd: Path, timeout: float,
                    columns: int = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin/stdout/stderr on a pseudo-terminal (so it sees a TTY, as in a user's shell).

    Returns the exit code and everything written to the terminal (``\\r`` kept: progress bars redraw
    with it; the terminal turns ``\\n`` into ``\\r\\n``, undone here).
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise AssertionError(f"{argv} ran past {timeout:.0f}s; output so far:\n"
                                     + b"".join(chunks).decode(errors="replace")[-4000:])
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: every writer closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait()
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


# ------------------------------------------------------------------------------- README's quickstart
def readme_section(title: str) -> str:
    """The text of README.md's first section whose ``## `` heading starts with ``title``."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no '## {title}...' section"
    return m.group(1)


def readme_code_blocks(title: str) -> list[str]:
    """The ```bash blocks of a README section, in order."""
    return re.findall(r"```bash\n(.*?)```", readme_section(title), re.S)


def readme_quickstart_commands() -> tuple[str, list[str]]:
    """README's quickstart: the `hf-gpt2-train train ...` command of its first line (after the install steps
    joined with &&), and the follow-up lines of the next block (checkpoints list, export, pipeline)."""
    blocks = readme_code_blocks("Quickstart")
    assert len(blocks) >= 2, "README's quickstart needs the install+train line and the follow-up block"
    train = [c.strip() for c in blocks[0].strip().split("&&") if c.strip().startswith("hf-gpt2-train train")]
    assert len(train) == 1, f"README's quickstart has no single `hf-gpt2-train train` step: {blocks[0]!r}"
    follow = [line.strip() for line in blocks[1].strip().splitlines() if line.strip()]
    return train[0], follow


def shell_line(line: str) -> list[str]:
    """A README line run by bash exactly as written. Without the console script on PATH (a checkout that was
    never `pip install`ed), `hf-gpt2-train` is the same entry point through `python -m hf_gpt2_train`."""
    prelude = "" if (Path(sys.executable).parent / "hf-gpt2-train").exists() else \
        f'hf-gpt2-train() {{ {shlex.quote(sys.executable)} -m hf_gpt2_train "$@"; }}; '
    return ["bash", "-c", prelude + line]


@dataclass
class QuickstartRun:
    """README's quickstart command, run once per session as a new user runs it."""

    command: str
    follow_up: list[str]  # README's next lines (checkpoints list, export, pipeline), not run yet
    cwd: Path  # where it ran (relative paths in README's lines resolve here)
    env: dict[str, str]  # the user's environment it ran in (fresh HOME, no TIKTOKEN_*/HF_* variables)
    output_dir: Path
    returncode: int
    output: str  # everything the terminal showed (stdout and stderr together, progress bar included)
    offline: bool  # True when it ran with the network namespace cut off
    seconds: float

    def run_line(self, line: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run one more README line in the same folder and environment, offline like the quickstart."""
        return subprocess.run(offline(shell_line(line)), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session")
def readme_quickstart(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    """README's quickstart `hf-gpt2-train train ...` exactly as written (parsed from README.md), in an empty
    folder, with a fresh HOME, no TIKTOKEN_*/HF_* variables, no network and a terminal."""
    command, follow = readme_quickstart_commands()
    out_arg = shlex.split(command)[shlex.split(command).index("--output_dir") + 1]
    cwd = tmp_path_factory.mktemp("readme_quickstart")
    home = cwd.parent / f"{cwd.name}-home"
    home.mkdir()
    env = user_env(home)
    t0 = time.monotonic()
    code, output = run_in_terminal(offline(shell_line(command)), env, cwd, timeout=1800)
    return QuickstartRun(command=command, follow_up=follow, cwd=cwd, env=env, output_dir=cwd / out_arg,
                         returncode=code, output=output, offline=no_network_available(),
                         seconds=time.monotonic() - t0)


def train_losses(output_dir: Path) -> dict[int, float]:
    """step -> train/loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's --master_port: parallel runs must not collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
