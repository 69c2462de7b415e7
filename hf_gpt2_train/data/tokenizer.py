"""The GPT-2 tokenizer: tiktoken's ``gpt2`` Encoding, built from the vocabulary shipped in the package.

GPT-2's ranks (tiktoken's ``r50k_base``, the same ids as its ``gpt2``) ship as
``hf_gpt2_train/assets/gpt2.tiktoken`` (from openai/whisper, MIT; see ``assets/README.md``) and are checked
against tiktoken's own pinned sha256 each time they are loaded, so no command ever downloads a
vocabulary. ``--tokenizer_file`` overrides it: a ``gpt2.tiktoken`` / ``r50k_base.tiktoken`` ranks file, a
folder holding one, or a folder with GPT-2's original ``encoder.json`` + ``vocab.bpe``. Either way the
Encoding is the very same (50,256 BPE ranks + ``<|endoftext|>`` = 50256).
"""

from __future__ import annotations

import base64
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
# The vocabulary shipped in the package, and the sha256 tiktoken pins for it
# (tiktoken_ext/openai_public.py: r50k_base, expected_hash=...).
BUNDLED_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken"
R50K_BASE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}
_hashes: dict[int, str] = {}


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """A tiktoken ranks file (``base64(token) rank`` per line) -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    if not ranks:
        raise ValueError(f"{source} is empty")
    return ranks


def bundled_ranks(path: Path = BUNDLED_VOCAB) -> dict[bytes, int]:
    """The ranks of the vocabulary shipped in the package, after checking tiktoken's pinned sha256."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"the GPT-2 vocabulary shipped with hf-gpt2-train is missing ({path}: {e.strerror}): "
                          "reinstall the package, or pass --tokenizer_file /path/to/gpt2.tiktoken") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != R50K_BASE_SHA256:
        raise ConfigError(f"the GPT-2 vocabulary shipped with hf-gpt2-train ({path}) is damaged (sha256 "
                          f"{digest[:12]}..., expected {R50K_BASE_SHA256[:12]}...): reinstall the package, or pass "
                          "--tokenizer_file /path/to/gpt2.tiktoken")
    return parse_ranks(data, str(path))


def _ranks_from_path(path: Path) -> dict[bytes, int]:
    if path.is_dir():
        for name in ("gpt2.tiktoken", "r50k_base.tiktoken"):
            if (path / name).is_file():
                return parse_ranks((path / name).read_bytes(), str(path / name))
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks

            return data_gym_to_mergeable_bpe_ranks(str(path / "vocab.bpe"), str(path / "encoder.json"))
        raise ConfigError(f"--tokenizer_file {path} is a folder without gpt2.tiktoken (or encoder.json + vocab.bpe): "
                          "point it at GPT-2's gpt2.tiktoken file")
    return parse_ranks(path.read_bytes(), str(path))


def get_encoding(tokenizer_file: str = "") -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` Encoding: from ``tokenizer_file`` when given, else from the bundled vocabulary.

    Never touches the network (nor tiktoken's download cache).
    """
    key = str(Path(tokenizer_file).expanduser().resolve()) if tokenizer_file else ""
    with _lock:
        if key in _cache:
            return _cache[key]
        if tokenizer_file:
            path = Path(key)
            if not path.exists():
                raise ConfigError(f"--tokenizer_file {tokenizer_file} does not exist: pass the path of GPT-2's "
                                  "gpt2.tiktoken file (or leave it out: the package ships one)")
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
        else:
            ranks = bundled_ranks()
        enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=N_VOCAB)
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
