"""Tests of prunekit.evaluate on tiny random models: offline and fast."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.evaluate import (
    accuracy,
    evaluate,
    format_table,
    latency,
    perplexity,
    size_report,
    summary_row,
)
from prunekit.evaluate.perplexity import plan_windows

VOCAB = 64


def tiny_llama(tie: bool = False, max_positions: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_bert_config(**extra: Any) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, **extra)


def stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class UniformLM(nn.Module):
    """Logits all zero: every token has probability 1/vocab, so perplexity is exactly vocab."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=1024)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size))


# ---------------------------------------------------------------------------------------------
# perplexity


def hf_reference(model: nn.Module, tokens: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Independent: HF's own mean loss per non-overlapping window, token-weighted."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.numel() - seq_len + 1, seq_len):
            window = tokens[start:start + seq_len][None]
            loss = model(input_ids=window, labels=window).loss
            total += float(loss) * (seq_len - 1)
            count += seq_len - 1
    return math.exp(total / count), count


def test_perplexity_matches_hf_loss() -> None:
    model = tiny_llama()
    seq_len = 16
    tokens = stream(3 * seq_len + 5)  # 3 windows, 5 tokens dropped
    expected, count = hf_reference(model, tokens, seq_len)
    result = perplexity(model, tokens, seq_len=seq_len, progress=False)
    assert result.n_windows == 3
    assert result.n_tokens == count == 3 * (seq_len - 1)
    assert result.stride == seq_len
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert "non-overlapping 16-token windows" in result.protocol and "last 5 tokens" in result.protocol
    batched = perplexity(model, tokens, seq_len=seq_len, batch_size=2, progress=False)
    assert batched.perplexity == pytest.approx(result.perplexity, rel=1e-5)


def test_perplexity_max_tokens_cuts_stream() -> None:
    model = tiny_llama()
    tokens = stream(100)
    result = perplexity(model, tokens, seq_len=16, max_tokens=40, progress=False, source="toy/eval")
    expected, count = hf_reference(model, tokens[:40], 16)
    assert result.n_windows == 2 and result.n_tokens == count
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert "first 40 tokens of toy/eval" in result.protocol


def test_uniform_logits_give_vocab_size() -> None:
    # exact up to float32 log-softmax rounding (about 1e-8 relative)
    result = perplexity(UniformLM(), stream(200), seq_len=32, progress=False)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    slide = perplexity(UniformLM(), stream(200), seq_len=32, stride=8, progress=False)
    assert slide.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert slide.n_tokens == 199


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(64, 16, 4), (67, 16, 4), (16, 16, 1), (50, 10, 7)])
def test_sliding_windows_score_every_token_once(n: int, seq_len: int, stride: int) -> None:
    windows = plan_windows(n, seq_len, stride)
    scored = [pos for start, first in windows for pos in range(first, start + seq_len)]
    assert sorted(scored) == list(range(1, n))
    assert all(start + seq_len <= n for start, _ in windows)


def test_sliding_perplexity_matches_hand_computation() -> None:
    model = tiny_llama()
    seq_len, stride, n = 16, 4, 40  # (n - seq_len) divisible by stride: HF's recipe uses the same windows
    tokens = stream(n)
    result = perplexity(model, tokens, seq_len=seq_len, stride=stride, progress=False)
    assert result.n_tokens == n - 1
    assert result.n_windows == (n - seq_len) // stride + 1
    # the recipe from the transformers perplexity guide, with an exact token count
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n - seq_len + 1, stride):
            end = begin + seq_len
            ids = tokens[begin:end][None]
            target = ids.clone()
            target[:, : seq_len - (end - prev_end)] = -100
            valid = int((target[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=target).loss) * valid
            count += valid
            prev_end = end
    assert count == n - 1
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "sliding" in result.protocol


def test_perplexity_errors() -> None:
    model = tiny_llama(max_positions=32)
    with pytest.raises(PrunekitError, match="only 10 tokens of evaluation text.*lower --seq-len"):
        perplexity(model, stream(10), seq_len=16, progress=False)
    with pytest.raises(PrunekitError, match="sequence length 64 is above the model's limit of 32: lower --seq-len"):
        perplexity(model, stream(200), seq_len=64, progress=False)
    with pytest.raises(PrunekitError, match="stride"):
        perplexity(model, stream(200), seq_len=16, stride=17, progress=False)
    with pytest.raises(PrunekitError, match="language-modelling head"):
        bert = BertForSequenceClassification(tiny_bert_config(num_labels=2))
        perplexity(bert, stream(100), seq_len=16, progress=False)


def test_perplexity_restores_training_mode() -> None:
    model = tiny_llama().train()
    perplexity(model, stream(40), seq_len=16, progress=False)
    assert model.training


# ---------------------------------------------------------------------------------------------
# size


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


def test_size_report_exact_counts() -> None:
    model = tiny_llama()
    layers = block_linears(model)
    target = model.model.layers[0].mlp.down_proj  # (32, 64)
    before = size_report(model, layers=layers)
    assert before.prunable_nonzero == before.prunable_params  # random init: no zeros in the blocks
    padding_row = 32  # the embedding row of pad_token_id is initialised to zeros
    assert before.nonzero_params == before.total_params - padding_row
    with torch.no_grad():
        target.weight[:, :16] = 0.0  # 32 * 16 = 512 zeros
    report = size_report(model, layers=layers)
    total = sum(p.numel() for p in model.parameters())
    assert report.total_params == total
    assert report.nonzero_params == total - padding_row - 512
    assert report.prunable_params == sum(m.weight.numel() for m in layers.values())
    assert report.prunable_nonzero == report.prunable_params - 512
    assert report.prunable_sparsity == pytest.approx(512 / report.prunable_params)
    assert report.total_sparsity == pytest.approx((512 + padding_row) / total)
    row = {r.name: r for r in report.layers}["model.layers.0.mlp.down_proj"]
    assert row.shape == (32, 64) and row.params == 2048 and row.nonzero == 1536 and row.sparsity == 0.25
    assert len(report.layers) == 14 and report.bytes_on_disk is None
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert report.bytes_in_memory == total * 4 + buffers


def test_size_report_counts_tied_embeddings_once() -> None:
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    tied_report = size_report(tied, layers=block_linears(tied))
    untied_report = size_report(untied, layers=block_linears(untied))
    assert untied_report.total_params - tied_report.total_params == VOCAB * 32
    state_total = sum(t.numel() for t in tied.state_dict().values())
    assert tied_report.total_params == state_total - VOCAB * 32


def test_size_report_default_layers_and_disk(tmp_path: Path) -> None:
    model = tiny_llama()
    report = size_report(model, path=None)
    assert {r.name for r in report.layers} == set(block_linears(model))
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files
    saved = size_report(model, layers=block_linears(model), path=tmp_path)
    assert saved.bytes_on_disk == sum(f.stat().st_size for f in files)
    with pytest.raises(PrunekitError, match="does not exist"):
        size_report(model, layers={}, path=tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# accuracy


class FakeTokenizer:
    """Char-level ids; records whether it was called with pairs."""

    def __init__(self) -> None:
        self.pair_calls = 0

    def _ids(self, text: str) -> list[int]:
        return [3 + ord(c) % (VOCAB - 3) for c in text] or [0]

    def __call__(self, text: Any, text_pair: Any = None, **kwargs: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self._ids(text)}
        if text_pair is not None:
            self.pair_calls += 1
            text = [a + " " + b for a, b in zip(text, text_pair, strict=True)]
        rows = [self._ids(t)[: kwargs.get("max_length", 128)] for t in text]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class LengthClassifier(nn.Module):
    """Predicts class 1 for texts longer than 5 tokens, else 0."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=2)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        long = (attention_mask.sum(dim=1) > 5).float()
        return SimpleNamespace(logits=torch.stack([1 - long, long], dim=1))


def test_accuracy_counts_correct() -> None:
    examples = [("short", 0), ("a much longer text", 1), ("tiny", 1), ("another long one", 0), ("xy", 0)]
    result = accuracy(LengthClassifier(), FakeTokenizer(), examples, batch_size=2, progress=False, split="test")
    assert (result.correct, result.n_examples, result.split) == (3, 5, "test")
    assert result.accuracy == pytest.approx(0.6)


def test_accuracy_pairs_and_real_model() -> None:
    tokenizer = FakeTokenizer()
    examples = [(("a", "b"), 1), (("a long first part", "second"), 1), (("c", "d"), 0)]
    result = accuracy(LengthClassifier(), tokenizer, examples, progress=False)
    assert tokenizer.pair_calls == 1 and result.correct == 2
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    with torch.no_grad():  # classifier returns only its bias: always class 2
        bert.classifier.weight.zero_()
        bert.classifier.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    result = accuracy(bert, tokenizer, [("x", 2), ("yy", 2), ("zzz", 0)], progress=False)
    assert result.correct == 2
    with pytest.raises(PrunekitError, match="3 classes"):
        accuracy(bert, tokenizer, [("x", 5)], progress=False)
    with pytest.raises(PrunekitError, match="no examples"):
        accuracy(bert, tokenizer, [], progress=False)


# ---------------------------------------------------------------------------------------------
# latency


def test_latency_causal_lm_has_decode_time() -> None:
    result = latency(tiny_llama(), batch_size=2, seq_len=8, n_warmup=1, n_runs=3, gen_tokens=4)
    assert result.forward_ms_median > 0 and result.tokens_per_second > 0
    low, high = result.forward_ms_iqr
    assert 0 < low <= result.forward_ms_median <= high
    assert result.decode_ms_per_token is not None and result.decode_ms_per_token > 0
    assert result.gen_tokens == 4 and result.threads == torch.get_num_threads()
    assert (result.device, result.dtype, result.batch_size, result.seq_len) == ("cpu", "float32", 2, 8)


def test_latency_encoder_has_no_decode_time() -> None:
    torch.manual_seed(0)
    result = latency(BertModel(tiny_bert_config()), seq_len=8, n_warmup=1, n_runs=2)
    assert result.forward_ms_median > 0 and result.decode_ms_per_token is None
    with pytest.raises(PrunekitError, match="above the model's limit"):
        latency(BertModel(tiny_bert_config()), seq_len=65, n_runs=1)


# ---------------------------------------------------------------------------------------------
# report


def test_format_table_formats_values() -> None:
    rows = [{"model": "dense", "perplexity": 42.6789, "sparsity": 0.0, "params": 134_515_008,
             "nonzero": 134_515_008, "bytes": 538_060_032, "latency_ms": 12.3456},
            {"model": "wanda-50%", "perplexity": 57.1, "sparsity": 0.5, "params": 134_515_008,
             "nonzero": 77_000_000, "bytes": None, "latency_ms": 11.0}]
    text = format_table(rows, title="before / after")
    for expected in ("before / after", "dense", "wanda-50%", "42.68", "57.10", "0.00%", "50.00%", "134.5M",
                     "77.0M", "size MB", "538.1", "forward ms", "12.35", "11.00", "-"):
        assert expected in text, expected
    assert "\x1b[" not in text
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert header.split()[:3] == ["model", "perplexity", "sparsity"]  # columns in order of first appearance


def test_format_table_fits_100_columns_with_a_long_path() -> None:
    path = "/home/someone/experiments/2025-06-01/out/smollm2-135m-sparsegpt-unstructured-50pct-seed0"
    dense = {"perplexity": {"perplexity": 35.2345}, "size": {
        "prunable_sparsity": 0.0, "total_params": 134_515_008, "nonzero_params": 134_515_008,
        "bytes_in_memory": 538_060_032, "bytes_on_disk": None},
        "latency": {"forward_ms_median": 146.21, "tokens_per_second": 875.4, "decode_ms_per_token": 32.91}}
    pruned = {**dense, "perplexity": {"perplexity": 51.35}, "size": {
        **dense["size"], "prunable_sparsity": 0.5, "nonzero_params": 77_000_000, "bytes_on_disk": 538_100_000}}
    rows = [summary_row(f"{path} (dense)", dense), summary_row("sparsegpt 0.5", pruned)]
    assert "disk_bytes" not in rows[0] and "tokens_per_second" not in rows[0]
    rows[0]["decode_ms_per_token"] = None  # a column that is None in one row shows '-'
    rows.append({"model": "extra", "unused": None})  # a column that is None in every row is left out
    text = format_table(rows, title=f"{path}: dense vs pruned on austen")
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), "\n".join(f"{len(line)}: {line}" for line in lines)
    assert "unused" not in text and "(dense)" in text and "sparsegpt 0.5" in text and "…" in text
    body = [line for line in lines if "(dense)" in line or line.startswith("sparsegpt")]
    assert len(body) == 2 and body[0].endswith("-") and "35.23" in body[0] and "51.35" in body[1]
    header = "\n".join(lines[:lines.index(next(line for line in lines if line.startswith("─")))])
    for word in ("perplexity", "sparsity", "params", "nonzero", "memory", "disk", "MB", "forward", "decode"):
        assert word in header, word
    assert header.index("memory") < header.index("disk")  # the disk size sits beside the memory size
    assert "538.1" in body[1] and "146.2" in body[0] and "134.5M" in body[0] and "77.0M" in body[1]
    train = format_table([{"model": "minilm-l6 (before)", "accuracy": 0.5284, "sparsity": 0.0, "steps": 0,
                           "train_s": 0.0},
                          {"model": path, "accuracy": 0.8068, "sparsity": 0.5, "steps": 200, "train_s": 1450.3}],
                         title="minilm-l6 trained with gmp on reviews")
    assert all(len(line) <= 100 for line in train.splitlines())
    assert "52.84%" in train and "80.68%" in train and "train" in train and "1,450" in train
    assert path[-40:] in train and "minilm-l6 (before)" in train  # a cut path keeps its end


def test_format_table_leaves_out_what_cannot_fit() -> None:
    row = {"model": "x" * 300, **{f"column_{index}": index * 1.5 for index in range(30)}}
    text = format_table([row], width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "left out to fit 80 columns" in text and "column 29" in text
    assert format_table([]) == "(nothing to show)\n" and format_table([{}], title="t") == "t\n(nothing to show)\n"


@dataclass
class FakeLabels:
    name: str
    splits: dict[str, list[Any]]
    label_names: list[str] = field(default_factory=list)


def test_evaluate_text_is_json_ready(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from prunekit.data import TextData  # eval_tokens checks the real class

    data = TextData("toy", {"eval": "the quick brown fox jumps over the lazy dog " * 4})
    out = evaluate(model, FakeTokenizer(), data, seq_len=16, latency_seq_len=8, gen_tokens=3, path=tmp_path,
                   progress=False)
    assert set(out) == {"perplexity", "size", "latency", "protocol"}
    assert out["perplexity"]["n_windows"] == (4 * 44) // 16
    assert out["size"]["bytes_on_disk"] > 0
    assert "toy/eval" in out["protocol"]["perplexity"]
    json.dumps(out)
    row = summary_row("dense", out)
    assert row["perplexity"] == out["perplexity"]["perplexity"] and "disk_bytes" in row
    assert "dense" in format_table([row])


def test_evaluate_classification_without_latency() -> None:
    data = FakeLabels("toy", {"train": [], "validation": [("hello there", 1), ("hi", 0)]}, ["a", "b"])
    out = evaluate(LengthClassifier(), FakeTokenizer(), data, measure_latency=False, progress=False)
    assert out["accuracy"] == {"accuracy": 1.0, "n_examples": 2, "correct": 2, "split": "validation"}
    assert "latency" not in out and out["size"]["total_params"] == 1
    json.dumps(out)
    with pytest.raises(PrunekitError, match="no split 'test'"):
        evaluate(LengthClassifier(), FakeTokenizer(), data, split="test", measure_latency=False)
