"""End-to-end checks on the real built-in model and data; skipped unless both are already prepared.

`make demo` prepares them into the user cache (~/.cache/prunekit, or $PRUNEKIT_CACHE when the
test session starts). These tests read that cache and never download anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

# conftest points PRUNEKIT_CACHE at an empty folder per test: remember the real one at import time
USER_CACHE = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit")
HAVE_REAL = (USER_CACHE / "models" / "smollm2-135m" / "config.json").is_file() and (
    USER_CACHE / "data" / "austen" / "manifest.json").is_file()

pytestmark = [pytest.mark.real_model, pytest.mark.real_data,
              pytest.mark.skipif(not HAVE_REAL, reason="run `make demo` first: needs smollm2-135m and austen prepared")]


def test_eval_perplexity_matches_plain_transformers(tmp_path, monkeypatch):
    """`prunekit eval --json` reports the perplexity that plain transformers gives on the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.cli.main import main

    monkeypatch.setenv("PRUNEKIT_CACHE", str(USER_CACHE))
    out = tmp_path / "eval.json"
    seq_len, max_tokens = 256, 1024
    code = main(["eval", "smollm2-135m", "--data", "austen", "--seq-len", str(seq_len), "--max-tokens",
                 str(max_tokens), "--no-latency", "--json", str(out)])
    assert code == 0
    reported = json.loads(out.read_text())["perplexity"]

    # independent computation: the model folder, the Persuasion text file, the tokenizer, HF's own loss
    folder = USER_CACHE / "models" / "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (USER_CACHE / "data" / "austen" / "eval.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            window = torch.tensor([ids[start:start + seq_len]])
            loss = model(input_ids=window, labels=window).loss.item()  # mean over seq_len - 1 predictions
            total_nll += loss * (seq_len - 1)
            scored += seq_len - 1
    expected = math.exp(total_nll / scored)
    assert reported["n_tokens"] == scored
    assert reported["perplexity"] == pytest.approx(expected, rel=1e-4)
