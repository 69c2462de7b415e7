"""The GPT-2 tokenizer: the vocabulary shipped in the package, --tokenizer_file, the vocabulary hash."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.tokenizer import (
    BUNDLED_VOCAB,
    EOT,
    GPT2_VOCAB_HASH,
    R50K_BASE_SHA256,
    bundled_ranks,
    get_encoding,
    vocab_hash,
)
from tests.conftest import offline, user_env


def test_round_trip_on_real_text(shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare.txt").read_text()
    enc = get_encoding()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert 0 < len(ids) < len(text)  # BPE merges: fewer tokens than characters
    assert max(ids) < EOT  # ordinary text never yields <|endoftext|>
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.n_vocab == 50257


def test_bundled_vocabulary_is_tiktokens_r50k_base_and_gpt2(shared_data: Path) -> None:
    """The shipped file has the sha256 tiktoken itself pins for r50k_base, and builds the same Encoding as
    GPT-2's original encoder.json + vocab.bpe (tiktoken's own `gpt2` definition) and a --tokenizer_file."""
    import inspect

    import tiktoken_ext.openai_public as openai_public

    assert f'expected_hash="{R50K_BASE_SHA256}"' in inspect.getsource(openai_public.r50k_base)
    assert hashlib.sha256(BUNDLED_VOCAB.read_bytes()).hexdigest() == R50K_BASE_SHA256
    assert BUNDLED_VOCAB.read_bytes() == (shared_data / "gpt2.tiktoken").read_bytes()
    assert (BUNDLED_VOCAB.parent / "README.md").read_text().count("MIT") >= 1  # source and license beside it

    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    bundled, local = get_encoding(), get_encoding(str(shared_data / "gpt2.tiktoken"))
    original = get_encoding(str(shared_data))  # a folder with GPT-2's original encoder.json + vocab.bpe
    assert local is not bundled and original is not bundled
    for other in (local, original):
        assert other.encode_ordinary(text) == bundled.encode_ordinary(text)
        assert other.encode("a<|endoftext|>b", allowed_special="all") == bundled.encode("a<|endoftext|>b",
                                                                                          allowed_special="all")
        assert other._mergeable_ranks == bundled._mergeable_ranks


def test_a_damaged_bundled_vocabulary_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "gpt2.tiktoken"
    data = bytearray(BUNDLED_VOCAB.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged.*reinstall the package"):
        bundled_ranks(bad)
    with pytest.raises(ConfigError, match="missing.*reinstall the package"):
        bundled_ranks(tmp_path / "gone.tiktoken")


def test_vocab_hash_identifies_the_vocabulary(shared_data: Path) -> None:
    online = get_encoding()  # the bundled vocabulary
    assert vocab_hash(online) == GPT2_VOCAB_HASH
    assert vocab_hash(get_encoding(str(shared_data / "gpt2.tiktoken"))) == GPT2_VOCAB_HASH
    # Another vocabulary: the same ranks with two tokens swapped must hash differently.
    ranks = dict(online._mergeable_ranks)
    a, b = online.decode_single_token_bytes(1000), online.decode_single_token_bytes(2000)
    ranks[a], ranks[b] = 2000, 1000
    other = tiktoken.Encoding(name="gpt2", pat_str=online._pat_str, mergeable_ranks=ranks,
                              special_tokens={"<|endoftext|>": EOT})
    assert vocab_hash(other) != GPT2_VOCAB_HASH


def test_bad_tokenizer_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        get_encoding(str(tmp_path / "nope.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not a ranks file\n")
    with pytest.raises(ConfigError, match="gpt2.tiktoken"):
        get_encoding(str(bad))


def test_prepare_data_needs_no_network_and_no_tiktoken_cache(tmp_path: Path) -> None:
    """A fresh machine with no network, no TIKTOKEN_CACHE_DIR and a new HOME tokenises with the bundled vocabulary
    and never writes a tiktoken cache."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = user_env(home, TMPDIR=str(tmp))  # tiktoken's own download cache would go to $TMPDIR/data-gym-cache
    proc = subprocess.run(offline([sys.executable, "-m", "hf_gpt2_train", "prepare-data", "--source", "embedded",
                                   "--output_dir", str(tmp_path / "out"), "--max_tokens", "30000", "--num_proc", "1",
                                   "--no_progress"]),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert list(tmp.iterdir()) == [] and list(home.iterdir()) == []  # no tiktoken cache, nothing in HOME


def test_the_wheel_ships_the_vocabulary(tmp_path: Path) -> None:
    """`pip install .` (a wheel) carries assets/gpt2.tiktoken byte for byte, and its README (source, license)."""
    import zipfile

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_gpt2_train-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("hf_gpt2_train/assets/gpt2.tiktoken") == BUNDLED_VOCAB.read_bytes()
        assert "MIT" in z.read("hf_gpt2_train/assets/README.md").decode()
