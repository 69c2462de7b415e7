"""HellaSwag: batched scoring equals a plain per-ending reference loop; tokenization; download and cache."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken
import torch
from accelerate import Accelerator

from hf_gpt2_train.config import ConfigError, ModelConfig, build_config
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.evaluate.hellaswag import hellaswag_eval, load_hellaswag, render_example, score_examples
from hf_gpt2_train.model import build_model, lm_logits, lm_loss

N_EXAMPLES = 40


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return get_encoding()


@pytest.fixture(scope="module")
def examples(shared_data: Path) -> list[dict]:
    return load_hellaswag(str(shared_data / "hellaswag_val.jsonl"))


@pytest.fixture(scope="module")
def trained(shared_data: Path, enc: tiktoken.Encoding) -> torch.nn.Module:
    """A quickstart-size GPT-2 trained briefly on real text, so ending losses differ clearly."""
    torch.manual_seed(0)
    cfg = build_config("quickstart").model
    model = build_model(cfg, seed=0)
    text = (shared_data / "tinyshakespeare.txt").read_text()[:50_000]
    data = torch.tensor(enc.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(10):
        idx = torch.randint(0, len(data) - 65, (4,), generator=gen)
        x = torch.stack([data[i: i + 64] for i in idx])
        y = torch.stack([data[i + 1: i + 65] for i in idx])
        loss = lm_loss(lm_logits(model, x, cfg.vocab_size), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert last < first - 1.0, (first, last)  # it learned something: not a near-uniform predictor
    return model.eval()


def reference_scores(model: torch.nn.Module, example: dict, enc: tiktoken.Encoding,
                     n_positions: int) -> tuple[list[float], list[float]]:
    """Plain loop, one forward per ending, no batching or padding: (total loss, mean loss) per ending."""
    ctx = enc.encode(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = enc.encode(" " + ending)
        ids = (ctx + end)[-n_positions:]
        n_end = min(len(end), len(ids) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :, :50257].float(), -1)
        # token ids[i] is predicted by the logits at position i - 1
        total = -sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n_end, len(ids)))
        sums.append(total)
        means.append(total / n_end)
    return sums, means


def _argmin(v: list[float]) -> int:
    return min(range(len(v)), key=v.__getitem__)


def _check_against_reference(model: torch.nn.Module, examples: list[dict], enc: tiktoken.Encoding,
                             n_positions: int) -> None:
    sum_b, mean_b = score_examples(model, examples, enc, 50257, batch_examples=3)
    ref = [reference_scores(model, ex, enc, n_positions) for ex in examples]
    ref_sum = torch.tensor([r[0] for r in ref])
    ref_mean = torch.tensor([r[1] for r in ref])
    torch.testing.assert_close(sum_b, ref_sum, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mean_b, ref_mean, rtol=1e-4, atol=1e-4)
    # per-example choices, both rules
    assert sum_b.argmin(1).tolist() == [_argmin(r[0]) for r in ref]
    assert mean_b.argmin(1).tolist() == [_argmin(r[1]) for r in ref]
    # acc / acc_norm of the distributed entry point (1 process, other batch size) match the reference
    acc = Accelerator(cpu=True)
    res = hellaswag_eval(model, examples, enc, acc, 50257, batch_examples=4)
    labels = [ex["label"] for ex in examples]
    n = len(examples)
    assert res["count"] == n
    assert res["acc"] == pytest.approx(sum(_argmin(r[0]) == lab for r, lab in zip(ref, labels, strict=True)) / n)
    assert res["acc_norm"] == pytest.approx(sum(_argmin(r[1]) == lab for r, lab in zip(ref, labels, strict=True)) / n)


def test_scoring_matches_reference_loop(trained, examples, enc) -> None:
    sub = examples[:N_EXAMPLES]
    assert max(len(r) for ex in sub for r in render_example(ex, enc, 10**9).rows) <= 128  # no cropping here
    _check_against_reference(trained, sub, enc, 128)
    # the two rules disagree somewhere, so the test tells acc from acc_norm
    sum_b, mean_b = score_examples(trained, sub, enc, 50257)
    assert (sum_b.argmin(1) != mean_b.argmin(1)).any()


def test_scoring_crops_long_rows_on_the_left(examples, enc) -> None:
    """A model with a short context keeps the last n_positions tokens of each row (the ending survives)."""
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=40), seed=3).eval()
    sub = examples[:12]
    rendered = [render_example(ex, enc, 40) for ex in sub]
    assert any(len(enc.encode(ex["ctx"])) + len(enc.encode(" " + ex["endings"][0])) > 40 for ex in sub)
    assert all(len(r) <= 40 for ex in rendered for r in ex.rows)
    _check_against_reference(model, sub, enc, 40)


def test_leading_space_rule(examples, enc) -> None:
    ex = examples[0]
    assert ex["ctx"] == "A man is sitting on a roof. he"
    r = render_example(ex, enc, 1024)
    ctx = enc.encode(ex["ctx"])
    for row, mask, ending in zip(r.rows, r.ending_mask, ex["endings"], strict=True):
        assert row[: len(ctx)] == ctx and mask[: len(ctx)] == [0] * len(ctx)
        end = row[len(ctx):]
        assert end == enc.encode(" " + ending) and mask[len(ctx):] == [1] * len(end)
        assert enc.decode(end) == " " + ending
    # the first ending token carries the space: " is" (318), not "is" (271)
    first = r.rows[0][len(ctx)]
    assert enc.decode([first]) == " is" and first != enc.encode("is")[0]
    assert r.label == 3


# ------------------------------------------------------------------------------------ download and cache
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server standing in for GitHub's raw file host, serving a folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_once_then_cached(http_dir, shared_data, tmp_path) -> None:
    url, root = http_dir
    (root / "hellaswag_val.jsonl").write_bytes((shared_data / "hellaswag_val.jsonl").read_bytes())
    cache = tmp_path / "cache"
    rows = load_hellaswag(cache_dir=str(cache), url=f"{url}/hellaswag_val.jsonl")
    assert len(rows) == 10042 and rows[0]["label"] == 3 and len(rows[0]["endings"]) == 4
    assert sorted(p.name for p in cache.iterdir()) == ["hellaswag_val.jsonl"]  # no temp files left
    (root / "hellaswag_val.jsonl").unlink()  # the source is gone: the cached copy serves
    assert load_hellaswag(cache_dir=str(cache), url=f"{url}/hellaswag_val.jsonl") == rows


def test_corrupt_download_is_not_cached(http_dir, shared_data, tmp_path) -> None:
    url, root = http_dir
    (root / "hellaswag_val.jsonl").write_bytes((shared_data / "hellaswag_val.jsonl").read_bytes()[:100_000])
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="corrupt.*--hellaswag_path"):
        load_hellaswag(cache_dir=str(cache), url=f"{url}/hellaswag_val.jsonl")
    assert list(cache.iterdir()) == []


def test_no_network_names_the_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_GPT2_TRAIN_HELLASWAG_URL", f"http://127.0.0.1:{_free_port()}/hellaswag_val.jsonl")
    monkeypatch.setenv("HF_GPT2_TRAIN_CACHE", str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="--hellaswag_path"):
        load_hellaswag()
    assert not (tmp_path / "c" / "hellaswag" / "hellaswag_val.jsonl").exists()


def test_bad_local_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist: check --hellaswag_path"):
        load_hellaswag(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 .*4 endings"):
        load_hellaswag(str(bad))
