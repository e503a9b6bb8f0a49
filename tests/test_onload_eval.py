"""Perplexity with sequential onloading (`prunekit eval --onload`, `prunekit prune --onload ... --eval`).

The onloaded perplexity must be the full load's (same windows, BOS token, protocol sentence), with at
most a bounded number of blocks in memory at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import families
from cli_helpers import run
from conftest import build_tiny_model, build_tiny_tokenizer

TEXT = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. The quick brown fox jumps over the lazy dog."] * 60)


def notes(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prunekit:")]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def llama_dir(tmp_path: Path, layers: int = 4, **overrides: Any) -> Path:
    folder = tmp_path / "llama"
    build_tiny_model("llama", num_hidden_layers=layers, **overrides).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def family_dir(tmp_path: Path, family: str) -> Path:
    if family == "llama":
        return llama_dir(tmp_path)
    folder = tmp_path / family
    families.build(family).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


# ---- the API: same perplexity and size as a full load, few blocks in memory -----------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding-window and global layers, window 4 < 16
@pytest.mark.parametrize("windows", [{"batch_size": 1, "bos_token_id": 2}, {"batch_size": 3, "stride": 5}])
def test_onloaded_perplexity_equals_the_full_load(tmp_path: Path, family: str, windows: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from prunekit.evaluate.perplexity import perplexity
    from prunekit.evaluate.size import size_report
    from prunekit.onload import build_skeleton
    from prunekit.onload_eval import _CountingOnloader, onloaded_perplexity, onloaded_size

    assert family == "llama" or family in families.MIXED_LAYER_TYPES
    folder = family_dir(tmp_path, family)
    tokens = torch.randint(4, 100, (200,), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = perplexity(full, tokens, seq_len=16, progress=False, **windows)

    model = build_skeleton(folder, "causal-lm", torch.float32)
    onloader = _CountingOnloader(model, folder)
    counts: list[int] = []
    for block in onloader.blocks:  # at every call of a block: how many blocks have weights in memory
        block.register_forward_pre_hook(lambda *_: counts.append(onloader.materialised_blocks()))
    got = onloaded_perplexity(model, onloader, tokens, seq_len=16, device="cpu", progress=False, **windows)
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    assert (got.n_tokens, got.n_windows, got.protocol) == (expected.n_tokens, expected.n_windows, expected.protocol)
    assert counts and max(counts) <= 2 and onloader.peak_blocks <= 2, counts
    assert all(p.device.type == "meta" for p in model.parameters())  # everything freed again
    assert asdict(onloaded_size(model, onloader, folder)) == asdict(size_report(full, path=folder))


# ---- prunekit eval --onload ---------------------------------------------------------------------------------------
def eval_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[dict[str, Any], str, str]:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    code, stdout, err = run(capsys, "eval", *argv, "--seq-len", "16", "--device", "cpu", "--json", str(out),
                            *([] if "--max-tokens" in argv else ["--max-tokens", "600"]))
    assert code == 0, err
    return json.loads(out.read_text()), stdout, err


def test_cli_eval_onload_always_prints_the_full_load_perplexity(capsys, tmp_path: Path, text_file: Path) -> None:
    folder = llama_dir(tmp_path, tie_word_embeddings=True)
    data = f"text:{text_file}"
    full, full_out, full_err = eval_json(capsys, tmp_path, str(folder), "--data", data, "--onload", "never",
                                         "--no-latency")
    onloaded, out, err = eval_json(capsys, tmp_path, str(folder), "--data", data, "--onload", "always")
    assert not notes(full_err) and "onload" not in full
    assert onloaded["perplexity"]["perplexity"] == pytest.approx(full["perplexity"]["perplexity"], rel=1e-5)
    assert onloaded["perplexity"]["n_tokens"] == full["perplexity"]["n_tokens"]
    assert onloaded["size"] == full["size"]
    assert onloaded["onload"]["blocks_in_memory_at_most"] <= 2
    assert "latency" not in onloaded
    assert [line for line in out.splitlines() if "protocol" in line] == \
        [line for line in full_out.splitlines() if "protocol" in line]
    assert out.split("perplexity protocol")[0] == full_out.split("perplexity protocol")[0]  # the same table
    assert len(notes(err)) == 1 and "latency is not timed with sequential onloading" in notes(err)[0], err


def test_cli_eval_onload_auto_follows_the_memory(capsys, tmp_path: Path, text_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.onload as onload

    folder = llama_dir(tmp_path, layers=2)
    args = (str(folder), "--data", f"text:{text_file}", "--no-latency")
    monkeypatch.setattr(onload, "available_memory", lambda: 10**12)
    big, _, _ = eval_json(capsys, tmp_path, *args)
    monkeypatch.setattr(onload, "available_memory", lambda: 1000)
    small, _, err = eval_json(capsys, tmp_path, *args)
    assert "onload" not in big and small["onload"]["mode"] == "auto" and not notes(err), err
    assert small["perplexity"]["perplexity"] == pytest.approx(big["perplexity"]["perplexity"], rel=1e-5)


def fake_tasks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """lm-eval replaced by a stub that counts its calls and returns an empty summary."""
    import prunekit.evaluate.harness as harness

    calls: list[int] = []

    def run_tasks(model: Any, *_: Any, **__: Any) -> dict[str, Any]:
        assert all(p.device.type != "meta" for p in model.parameters())  # the whole model
        calls.append(1)
        return {"tasks": {}, "lm_eval_version": "stub", "batch_size": 8, "max_length": 16, "num_fewshot": None,
                "limit": None, "task_folder": "stub"}

    monkeypatch.setattr(harness, "run_tasks", run_tasks)
    return calls


def test_cli_eval_what_onloading_cannot_do_is_one_note(capsys, tmp_path: Path, text_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_tasks(monkeypatch)
    folder = llama_dir(tmp_path, layers=2)
    results, _, err = eval_json(capsys, tmp_path, str(folder), "--data", f"text:{text_file}", "--tasks",
                                "austen-cloze", "--onload", "always", "--no-latency")
    assert calls and "onload" not in results and "perplexity" in results
    assert len(notes(err)) == 1 and "--tasks" in notes(err)[0] and notes(err)[0].endswith("loading the whole model")

    bert = tmp_path / "bert"
    build_tiny_model("bert").save_pretrained(bert)
    build_tiny_tokenizer().save_pretrained(bert)
    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{'good fun' if i % 2 else 'bad dull'} {i},{i % 2}\n"
                                            for i in range(40)))
    results, _, err = eval_json(capsys, tmp_path, str(bert), "--data", f"csv:{csv}", "--onload", "always",
                                "--no-latency")
    assert "accuracy" in results and "onload" not in results
    assert len(notes(err)) == 1 and "labelled data" in notes(err)[0], err


# ---- prunekit prune --onload always --eval ----------------------------------------------------------------------
def prune_args(folder: Path, out: Path, text_file: Path, *extra: str) -> list[str]:
    return ["prune", str(folder), "--method", "wanda", "--sparsity", "0.5", "--calib", f"text:{text_file}",
            "--calib-samples", "4", "--seq-len", "16", "--eval", f"text:{text_file}", "--eval-tokens", "400",
            "--out", str(out), "--device", "cpu", *extra]


def test_prune_onloaded_with_eval_shows_dense_and_pruned_as_a_full_load(capsys, tmp_path: Path,
                                                                          text_file: Path) -> None:
    folder = llama_dir(tmp_path)
    runs = {}
    for mode in ("never", "always"):
        out = tmp_path / f"out-{mode}"
        code, stdout, err = run(capsys, *prune_args(folder, out, text_file, "--onload", mode))
        assert code == 0, err
        assert not notes(err), err  # onloaded when asked, no fallback
        runs[mode] = (json.loads((out / "prunekit.json").read_text()), stdout)
    (full, full_out), (onloaded, out_text) = runs["never"], runs["always"]
    assert "onload" in onloaded and "onload" not in full
    assert onloaded["evaluation"]["latency"] == full["evaluation"]["latency"]
    for which in ("dense", "pruned"):
        got, expected = onloaded["evaluation"][which], full["evaluation"][which]
        assert got["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"]["perplexity"], rel=1e-5)
        assert got["protocol"]["perplexity"] == expected["protocol"]["perplexity"]
        assert got["size"] == expected["size"]
    dense, pruned = (onloaded["evaluation"][w]["perplexity"]["perplexity"] for w in ("dense", "pruned"))
    assert dense != pruned
    table = out_text.split("protocol:")[0]
    assert "dense vs pruned" in table and f"{dense:,.2f}" in table and f"{pruned:,.2f}" in table
    assert table.replace("out-always", "out-never") == full_out.split("protocol:")[0]

    # and both equal a separate full-load evaluation of each folder
    for which, source in (("dense", folder), ("pruned", tmp_path / "out-always")):
        separate, _, _ = eval_json(capsys, tmp_path, str(source), "--data", f"text:{text_file}", "--max-tokens",
                                   "400", "--onload", "never", "--no-latency")
        assert separate["perplexity"]["perplexity"] == pytest.approx(
            onloaded["evaluation"][which]["perplexity"]["perplexity"], rel=1e-5)


def test_prune_onloaded_with_tasks_loads_the_whole_model(capsys, tmp_path: Path, text_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_tasks(monkeypatch)
    folder = llama_dir(tmp_path, layers=2)
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(folder, out, text_file, "--tasks", "austen-cloze", "--onload", "always",
                                           "--no-latency"))
    assert code == 0, err
    assert len(calls) == 2  # dense and pruned, each whole
    assert len(notes(err)) == 1 and "sequential onloading (--onload always) is not used" in notes(err)[0], err
    assert "--tasks" in notes(err)[0] and notes(err)[0].endswith("loading the whole model")
    assert "onload" not in json.loads((out / "prunekit.json").read_text())
