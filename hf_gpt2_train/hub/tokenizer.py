"""tiktoken's ``gpt2`` encoding as a Hugging Face tokenizer.

tiktoken stores GPT-2's BPE as byte-string ranks; transformers wants ``vocab.json`` + ``merges.txt`` in
the byte-to-unicode alphabet of the original GPT-2 release (or a ``tokenizer.json`` built from them).
We derive both from the ranks, so the exported tokenizer is exactly the encoding the model was trained
with (including a ``--tokenizer_file`` the user trained with), not a copy downloaded from somewhere else:

* vocab: every rank's bytes mapped through ``bytes_to_unicode``, plus the special ``<|endoftext|>``;
* merges: for each multi-byte token in rank order, run BPE on its bytes using only lower ranks; what is
  left is exactly two parts, and that pair is the merge that created the token. For tiktoken's gpt2
  this reproduces OpenAI's original ``vocab.bpe`` line for line (tested), so HF's merge-priority BPE and
  tiktoken's rank BPE give identical ids.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import tiktoken

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.data.tokenizer import ENDOFTEXT as EOT
from hf_gpt2_train.data.tokenizer import get_encoding


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in OpenAI's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def vocab_and_merges(enc: tiktoken.Encoding) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive GPT-2 style ``vocab`` and ordered ``merges`` from a tiktoken byte-level BPE encoding."""
    ranks: dict[bytes, int] = enc._mergeable_ranks  # tiktoken exposes no public accessor for the ranks

    def split(token: bytes, below: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 1:
            best: tuple[int, int] | None = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < below and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[_to_unicode(token)] = rank
        if len(token) == 1:
            continue
        parts = split(token, rank)
        if len(parts) != 2:
            raise ConfigError(f"tokenizer token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                              "only byte-level BPE encodings like tiktoken's gpt2 can be exported")
        merges.append((_to_unicode(parts[0]), _to_unicode(parts[1])))
    for name, idx in enc._special_tokens.items():
        vocab[name] = idx
    return vocab, merges


def save_hf_tokenizer(out_dir: Path, tokenizer_file: str = "", model_max_length: int = 1024) -> list[str]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``.

    The tokenizer class is transformers' own GPT-2 tokenizer (byte-level BPE, ``<|endoftext|>`` as
    bos/eos/unk, no prefix space), so ``AutoTokenizer.from_pretrained(out_dir)`` needs no custom code.
    Returns the names of the files written.
    """
    from transformers import GPT2TokenizerFast

    enc = get_encoding(tokenizer_file)
    if EOT not in enc._special_tokens:
        raise ConfigError(f"tokenizer {enc.name!r} has no {EOT} token: export needs the gpt2 encoding")
    vocab, merges = vocab_and_merges(enc)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    before = {p.name for p in out_dir.iterdir()}
    tok = GPT2TokenizerFast(str(vocab_path), str(merges_path), model_max_length=model_max_length,
                            bos_token=EOT, eos_token=EOT, unk_token=EOT, add_prefix_space=False)
    tok.save_pretrained(str(out_dir))
    written = sorted({p.name for p in out_dir.iterdir()} - before | {"vocab.json", "merges.txt"})
    return written
