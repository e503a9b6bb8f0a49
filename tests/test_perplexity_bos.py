"""Perplexity windows that start with the BOS token, checked against lm-evaluation-harness's rolling log-likelihood.

lm-eval scores a document with ``HFLM.loglikelihood_rolling``: the BOS token, then the text, in windows of
``max_length``. For a document that fits in one window this is exactly a prunekit window with its BOS
token, so the same tokens cut into prunekit's windows and given to lm-eval one window per document must
give the same perplexity. (A document longer than ``max_length`` is scored differently by lm-eval:
its later windows start with one token of the text as context instead of the BOS token.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_TEXT, build_tiny_model, build_tiny_tokenizer
from prunekit.data.core import tokenize_text
from prunekit.errors import PrunekitError
from prunekit.evaluate import evaluate, perplexity
from prunekit.evaluate.perplexity import plan_windows

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")


def rolling(lm: object, texts: list[str]) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
                for i, text in enumerate(texts)]
    return lm.loglikelihood_rolling(requests, disable_tqdm=True)  # type: ignore[attr-defined]


def test_one_document_is_one_bos_window_as_in_lm_eval() -> None:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    text = TOKENIZER_TEXT[0]
    ids = tokenize_text(tokenizer, text)
    n = int(ids.numel())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    assert lm.tok_encode(text) == ids.tolist()  # both sides read the same tokens
    assert lm.prefix_token_id == tokenizer.bos_token_id
    (loglikelihood,) = rolling(lm, [text])
    ours = perplexity(model, ids, seq_len=n + 1, bos_token_id=tokenizer.bos_token_id, progress=False)
    assert ours.n_tokens == n and ours.n_windows == 1
    assert ours.perplexity == pytest.approx(math.exp(-loglikelihood / n), rel=1e-3)


def test_bos_windows_match_lm_eval_rolling_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of several windows: lm-eval scores each window's tokens as one document (its own windowing,
    prefix token and scoring code); the texts are keys for the token ids, so tokenisation plays no part."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    seq_len = 16
    stream = tokenize_text(tokenizer, " ".join(TOKENIZER_TEXT * 3))
    span = seq_len - 1
    n_windows = int(stream.numel()) // span
    ours = perplexity(model, stream, seq_len=seq_len, bos_token_id=tokenizer.bos_token_id, batch_size=3,
                      progress=False)
    assert ours.n_windows == n_windows and ours.n_tokens == n_windows * span

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=seq_len)
    chunks = {f"window {i}": stream[i * span:(i + 1) * span].tolist() for i in range(n_windows)}
    monkeypatch.setattr(lm, "tok_encode", lambda text, **kwargs: chunks[text])
    total = -sum(rolling(lm, list(chunks)))
    assert ours.perplexity == pytest.approx(math.exp(total / (n_windows * span)), rel=1e-3)


def test_bos_window_plan_scores_every_token_once() -> None:
    for n, span, stride in [(60, 15, 15), (64, 15, 4), (67, 15, 6), (15, 15, 1)]:
        windows = plan_windows(n, span, stride, score_first=True)
        scored = [pos for start, first in windows for pos in range(first, start + span)]
        if stride >= span:
            assert scored == list(range(len(windows) * span))
        else:
            assert sorted(scored) == list(range(n))


def test_bos_protocol_and_errors() -> None:
    model = build_tiny_model("llama")
    stream = torch.arange(3, 63)
    result = perplexity(model, stream, seq_len=16, bos_token_id=2, progress=False)
    assert result.n_windows == 4 and result.n_tokens == 60 and result.bos_token_id == 2
    assert "BOS token (id 2) followed by 15 text tokens" in result.protocol
    plain = perplexity(model, stream, seq_len=16, progress=False)
    assert plain.n_tokens == 3 * 15 and "no BOS token" in plain.protocol
    sliding = perplexity(model, stream, seq_len=16, stride=5, bos_token_id=2, progress=False)
    assert sliding.n_tokens == 60 and "every token" in sliding.protocol
    with pytest.raises(PrunekitError, match="stride 16 must be between 1 and the 15 text tokens.*BOS"):
        perplexity(model, stream, seq_len=16, stride=16, bos_token_id=2, progress=False)


def test_evaluate_puts_bos_first_unless_told_not_to(tmp_path: Path) -> None:
    from prunekit.data import load_data

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    path = tmp_path / "novel.txt"
    path.write_text("\n".join(TOKENIZER_TEXT * 4))
    data = load_data(f"text:{path}")
    assert data.splits["all"] == path.read_text()  # a local file's whole text is a split of its own
    with_bos = evaluate(model, tokenizer, data, seq_len=16, split="all", measure_latency=False, progress=False)
    without = evaluate(model, tokenizer, data, seq_len=16, split="all", measure_latency=False, progress=False,
                       bos=False)
    assert with_bos["perplexity"]["bos_token_id"] == tokenizer.bos_token_id
    assert "BOS token (id 2)" in with_bos["protocol"]["perplexity"]
    assert without["perplexity"]["bos_token_id"] is None and without["protocol"]["perplexity"].endswith("(--no-bos)")
    assert with_bos["perplexity"]["perplexity"] != without["perplexity"]["perplexity"]
    assert "absolute and machine-dependent" not in str(with_bos["protocol"])  # no latency measured here
