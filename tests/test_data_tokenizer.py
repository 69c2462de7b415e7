"""The GPT-2 tokenizer: tiktoken round trip, the offline --tokenizer_file path, the vocabulary hash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.tokenizer import EOT, GPT2_VOCAB_HASH, get_encoding, vocab_hash


def test_round_trip_on_real_text(shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare.txt").read_text()
    enc = get_encoding()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert 0 < len(ids) < len(text)  # BPE merges: fewer tokens than characters
    assert max(ids) < EOT  # ordinary text never yields <|endoftext|>
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.n_vocab == 50257


def test_tokenizer_file_builds_the_same_encoding_offline(shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    online, local = get_encoding(), get_encoding(str(shared_data / "gpt2.tiktoken"))
    assert local is not online
    assert local.encode_ordinary(text) == online.encode_ordinary(text)
    assert local.encode("a<|endoftext|>b", allowed_special="all") == online.encode("a<|endoftext|>b",
                                                                                     allowed_special="all")
    # GPT-2's original encoder.json + vocab.bpe (a folder) also work
    folder = get_encoding(str(shared_data))
    assert folder.encode_ordinary(text) == online.encode_ordinary(text)


def test_vocab_hash_identifies_the_vocabulary(shared_data: Path) -> None:
    online = get_encoding()
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


def test_offline_without_cache_names_the_fix(tmp_path: Path) -> None:
    """No vocabulary in the cache and no network: one line naming --tokenizer_file / TIKTOKEN_CACHE_DIR, exit 2."""
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    # A proxy on a closed loopback port makes the download fail at once, as on an offline machine.
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HF_GPT2_TRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "hf_gpt2_train.data.prepare", "--source", "embedded",
                           "--output_dir", str(tmp_path / "out"), "--no_progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--tokenizer_file" in lines[0] and "TIKTOKEN_CACHE_DIR" in lines[0]
    assert not (tmp_path / "out").exists()
