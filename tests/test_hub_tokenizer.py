"""The HF tokenizer we export is tiktoken's gpt2, id for id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.hub.tokenizer import save_hf_tokenizer, vocab_and_merges

TRICKY = [
    "Hello world",
    " leading space, double  space,   triple and trailing   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines\n",
    "numbers 0 7 42 1234567890 3.14159 -12,345.67 1e-5 2024-06-01",
    "contractions: it's we'll they've I'm you'd can't IT'S WE'LL",
    "unicode: café naïve Zürich façade Ångström — “quotes” ‘single’ … ½ ° µ",
    "CJK 日本語のテキスト 中文文本 한국어 텍스트",
    "emoji 🤗🚀 👩‍👩‍👧 flags 🇫🇷 and skin tones 👍🏽",
    "combining: e\u0301 a\u0308 and zero width\u200bspace, nbsp\u00a0here",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ↔, greek αβγ ΔΣΩ, cyrillic Привет мир",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: print('{}'.format(a))",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "a" * 300 + " " + "ab" * 150,
    "   \n   \n",
    "",
]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tok")
    written = save_hf_tokenizer(out, model_max_length=128)
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(written)
    return AutoTokenizer.from_pretrained(str(out)), out


def test_vocab_and_merges_derived_from_ranks_equal_openai_gpt2_files(shared_data: Path) -> None:
    vocab, merges = vocab_and_merges(get_encoding())
    assert vocab == json.loads((shared_data / "encoder.json").read_text(encoding="utf-8"))
    lines = (shared_data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    assert [f"{a} {b}" for a, b in merges] == [x for x in lines if x]


def test_tokenizer_matches_tiktoken_on_tinyshakespeare(hf_tok, shared_data: Path) -> None:
    tok, _ = hf_tok
    enc = get_encoding()
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    # Chunks of ~50 lines: the same input for both sides, and a mismatch points at the lines that differ.
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]
    assert sum(map(len, chunks)) == len(text) > 1_000_000
    hf_ids = tok(chunks, add_special_tokens=False)["input_ids"]
    n = 0
    for chunk, ids in zip(chunks, hf_ids, strict=True):
        assert ids == enc.encode_ordinary(chunk), chunk[:200]
        n += len(ids)
    assert n > 300_000
    assert tok.decode(hf_ids[0]) == chunks[0]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tokenizer_matches_tiktoken_on_tricky_text(hf_tok, text: str) -> None:
    tok, _ = hf_tok
    enc = get_encoding()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == enc.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_endoftext_is_the_special_token(hf_tok) -> None:
    tok, _ = hf_tok
    enc = get_encoding()
    text = "First document.<|endoftext|>Second one<|endoftext|>"
    assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert len(tok) == enc.n_vocab == 50257
    assert tok.model_max_length == 128
    # No bos/eos is added around ordinary text, as with GPT-2.
    assert tok("Hello")["input_ids"] == enc.encode_ordinary("Hello")


def test_tokenizer_from_local_tiktoken_file_is_identical(hf_tok, shared_data: Path, tmp_path: Path) -> None:
    _, default_dir = hf_tok
    save_hf_tokenizer(tmp_path, tokenizer_file=str(shared_data / "gpt2.tiktoken"), model_max_length=128)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (default_dir / name).read_bytes(), name
