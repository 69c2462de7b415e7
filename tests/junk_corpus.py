"""Build the junk-stretch corpus of issue 13: tiny Shakespeare with a stretch of random-token documents.

Documents are ~2,000-character pieces of ``tinyshakespeare.txt``; the junk documents are random GPT-2 token
ids decoded to text (their re-tokenisation is random tokens again). The junk is inserted so that, read in
order (``--shuffle false``), it starts with optimizer step ``junk_at_step``. Used by
tests/test_resilience_e2e.py and by the measurements in docs/resilience.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VAL_TOKENS = 20_000


def shakespeare_docs(shared_data: Path) -> list[str]:
    docs, cur = [], ""
    for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n"):
        cur += p + "\n\n"
        if len(cur) > 2000:
            docs.append(cur)
            cur = ""
    return [*docs, cur] if cur.strip() else docs


def junk_docs(n_docs: int, tokens_per_doc: int, seed: int = 0) -> list[str]:
    from hf_gpt2_train.data.tokenizer import get_encoding

    enc = get_encoding()
    rng = random.Random(seed)
    return [enc.decode([rng.randrange(50256) for _ in range(tokens_per_doc)]) for _ in range(n_docs)]


def write_corpus(path: Path, shared_data: Path, junk_at_step: int | None, tokens_per_step: int,
                 junk_tokens: int = 25_000, junk_at_end: bool = False) -> Path:
    """A .jsonl of documents: Shakespeare, with ``junk_tokens`` of junk from step ``junk_at_step`` (None: clean).

    ``junk_at_end``: the junk goes after the last document instead, where a short run never reads it; the corpus
    then has exactly as many training tokens as the one with the junk inside, so a checkpoint of one can be
    resumed on the other (the loader checks the token count).
    """
    from hf_gpt2_train.data.tokenizer import get_encoding

    docs = shakespeare_docs(shared_data)
    if junk_at_end:
        docs = docs + junk_docs(max(1, junk_tokens // 1000), 1000)
    elif junk_at_step is not None:
        enc = get_encoding()
        start = VAL_TOKENS + (junk_at_step - 1) * tokens_per_step
        seen, k = 0, 0
        while seen < start:  # the junk goes after the document that reaches the step's first token
            seen += 1 + len(enc.encode_ordinary(docs[k]))  # <|endoftext|> + the document
            k += 1
        docs = docs[:k] + junk_docs(max(1, junk_tokens // 1000), 1000) + docs[k:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path
