"""The GPT-2 tokenizer (tiktoken ``gpt2``), online or from a local ranks file.

tiktoken downloads GPT-2's vocabulary once into ``TIKTOKEN_CACHE_DIR``. Offline machines pass
``--tokenizer_file`` (a ``gpt2.tiktoken`` / ``r50k_base.tiktoken`` ranks file, or a folder holding one, or
a folder with GPT-2's original ``encoder.json`` + ``vocab.bpe``): we build the very same ``Encoding``
(50,256 BPE ranks + ``<|endoftext|>`` = 50256) without touching the network.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import tiktoken

from hf_gpt2_train.config import ConfigError

EOT: int = 50256
"""``<|endoftext|>``: written before every document."""
N_VOCAB: int = 50257
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex, as tiktoken's own gpt2/r50k_base definitions use it.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# vocab_hash() of GPT-2's vocabulary. Shards whose manifest carries another hash were made with another
# tokenizer and would train the model on the wrong ids; the loader refuses them.
GPT2_VOCAB_HASH = "2b793bb81fb231e2"

_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}
_hashes: dict[int, str] = {}


def _ranks_from_path(path: Path) -> dict[bytes, int]:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    if path.is_dir():
        for name in ("gpt2.tiktoken", "r50k_base.tiktoken"):
            if (path / name).is_file():
                return load_tiktoken_bpe(str(path / name))
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return data_gym_to_mergeable_bpe_ranks(str(path / "vocab.bpe"), str(path / "encoder.json"))
        raise ConfigError(f"--tokenizer_file {path} is a folder without gpt2.tiktoken (or encoder.json + vocab.bpe): "
                          "point it at GPT-2's gpt2.tiktoken file")
    return load_tiktoken_bpe(str(path))


def get_encoding(tokenizer_file: str = "") -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` Encoding; built from ``tokenizer_file`` when given (no network)."""
    key = str(Path(tokenizer_file).expanduser().resolve()) if tokenizer_file else ""
    with _lock:
        if key in _cache:
            return _cache[key]
        if tokenizer_file:
            path = Path(key)
            if not path.exists():
                raise ConfigError(f"--tokenizer_file {tokenizer_file} does not exist: pass the path of GPT-2's "
                                  "gpt2.tiktoken file")
            try:
                ranks = _ranks_from_path(path)
            except ConfigError:
                raise
            except Exception as e:  # malformed file: base64/ValueError/UnicodeError...
                raise ConfigError(f"--tokenizer_file {tokenizer_file} is not a tiktoken ranks file ({type(e).__name__}): "
                                  "pass GPT-2's gpt2.tiktoken") from None
            if len(ranks) != N_VOCAB - 1:
                raise ConfigError(f"--tokenizer_file {tokenizer_file} has {len(ranks)} tokens, GPT-2 has {N_VOCAB - 1} "
                                  "(+<|endoftext|>): pass GPT-2's gpt2.tiktoken")
            enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                    special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=N_VOCAB)
        else:
            try:
                enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # requests' ConnectionError, a hash mismatch, an unwritable cache...
                raise ConfigError(
                    f"could not load tiktoken's gpt2 vocabulary ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                    "connect once to download it, set TIKTOKEN_CACHE_DIR to a filled cache, or pass "
                    "--tokenizer_file /path/to/gpt2.tiktoken") from None
        _cache[key] = enc
        return enc


def vocab_hash(enc: tiktoken.Encoding) -> str:
    """sha256 (16 hex digits) of every token's bytes in id order plus the special tokens.

    Two encodings with the same hash map every text to the same ids' meanings; the encoding's name and
    the way it was loaded (download vs local file) do not enter it.
    """
    with _lock:
        if id(enc) in _hashes:
            return _hashes[id(enc)]
    h = hashlib.sha256()
    specials = {i for i in enc.special_tokens_set for i in [enc.encode_single_token(i)]}
    for i in range(enc.n_vocab):
        if i in specials:
            continue
        b = enc.decode_single_token_bytes(i)
        h.update(len(b).to_bytes(2, "little") + b)
    for s in sorted(enc.special_tokens_set):
        h.update(b"\xff" + s.encode() + enc.encode_single_token(s).to_bytes(4, "little"))
    out = h.hexdigest()[:16]
    with _lock:
        _hashes[id(enc)] = out
    return out
