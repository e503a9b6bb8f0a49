"""Encoder-decoder models (T5, BART): perplexity is refused in one line before any work; latency still runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer
from families import build
from prunekit.cli.main import main
from prunekit.evaluate.speed import compare_latency, latency
from prunekit.export import save_model

TEXT = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune."] * 80)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_perplexity_of_an_encoder_decoder_model_is_one_line_before_pruning(family: str, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_model(build(family), build_tiny_tokenizer(), tmp_path / family, record=None)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for argv in (["eval", str(folder), "--data", f"text:{text}", "--device", "cpu"],
                 ["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--eval", f"text:{text}",
                  "--device", "cpu", "--out", str(tmp_path / "out")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is an encoder-decoder model" in err[0] and "without --eval" in err[0]
    assert not (tmp_path / "out").exists()


def test_latency_of_an_encoder_decoder_model_times_encoder_and_decoder() -> None:
    model = build("t5")
    single = latency(model, seq_len=8, n_warmup=1, n_runs=2, gen_tokens=0)
    assert single.forward_ms_median > 0
    compared = compare_latency({"a": model, "b": build("t5", seed=1)}, seq_len=8, repeats=2, warmup=1, gen_tokens=0)
    assert compared["b"].forward_ratio > 0 and compared["a"].forward_ratio == pytest.approx(1.0)
